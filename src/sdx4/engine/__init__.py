"""The engine, in the order the data flows: `prompts` (text -> embeddings), `loop` (noise the low-res image,
denoise, decode: `upscale_tensor`), `denoiser` (the UNet calls of one step), `tiling` (overlapping latent
tiles), `budget` (the memory plan), `schedulers`, `vae/` (the tiled decoder), `colorfix`, `scale` (other
output scales as x4 passes), `classical` (interpolation: no torch).

Importing this package imports no torch; its torch modules import it when they are imported."""
