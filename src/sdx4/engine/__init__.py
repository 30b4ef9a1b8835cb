"""The engine, in the order the data flows: `prompts` (text -> embeddings), `loop` (noise the low-res image,
denoise, decode: `upscale_tensor`), `denoiser` (what the loop calls each step: guidance <- low-res conditioning
<- tiles <- UNet calls), `tiling` (overlapping latent tiles), `budget` (the memory plan), `decode_fit` (the VAE
decode's share of it, after the loop), `schedulers`, `vae/` (the tiled decoder), `colorfix`, `scale` (other
output scales as x4 passes), `classical` (interpolation: no torch).

Importing this package imports no torch; its torch modules import it when they are imported."""
