"""Measure the working memory of one UNet call and one VAE decode per latent pixel (fp32, CPU).

Each measurement runs in its own subprocess (peak RSS does not mix). The coefficients in
`sdx4.memory` come from this script's output:

    flock /tmp/sdx4-heavy.lock python benchmarks/calibrate_memory.py [MODEL_DIR]

Models and inputs are laid out channels-last, with the UNet's transformer outputs kept channels-last,
as sdx4 runs them on the CPU (`Placement.channels_last`); `--contiguous` measures diffusers' layout.
"""

from __future__ import annotations

from _proc import proc_status  # benchmarks/_proc.py (the script's folder is on sys.path)

import json
import subprocess
import sys




def _reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def child(model: str, part: str, size: int, batch: int, channels_last: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdx4.speed.channels_last import keep_transformer_outputs_channels_last

    torch.set_grad_enabled(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if part == "unet":
        m = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval().to(memory_format=fmt)
        if channels_last:
            keep_transformer_outputs_channels_last(m)
        x = torch.randn(batch, 7, size, size).contiguous(memory_format=fmt)
        emb = torch.randn(batch, 77, m.config.cross_attention_dim)
        cls = torch.full((batch,), 20)
        m(x[..., :8, :8], 500, encoder_hidden_states=emb, class_labels=cls)  # page the (mmapped) weights in
        base = _reset_peak()
        m(x, 500, encoder_hidden_states=emb, class_labels=cls)
    else:
        m = AutoencoderKL.from_pretrained(model, subfolder="vae").eval().to(memory_format=fmt)
        x = torch.randn(batch, 4, size, size).contiguous(memory_format=fmt)
        m.decode(x[..., :8, :8])  # page the (mmapped) weights in
        base = _reset_peak()
        m.decode(x)
    peak = proc_status("VmHWM")
    print(json.dumps({"part": part, "size": size, "batch": batch, "channels_last": channels_last,
                      "work_bytes": peak - base, "base": base}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "cl")
        return
    from sdx4.model.random_model import cached_random_model

    args = [a for a in sys.argv[1:] if a != "--contiguous"]
    layout = "contiguous" if "--contiguous" in sys.argv else "cl"
    model = args[0] if args else str(cached_random_model("full"))
    rows = []
    for part, size, batch in [("unet", 64, 2), ("unet", 128, 2), ("unet", 192, 2), ("unet", 64, 4),
                              ("vae", 32, 1), ("vae", 64, 1), ("vae", 96, 1)]:
        out = subprocess.run([sys.executable, __file__, "--child", model, part, str(size), str(batch), layout],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["bytes_per_pixel_sample"] = row["work_bytes"] / (size * size * batch)
        print(json.dumps(row), flush=True)
        rows.append(row)


if __name__ == "__main__":
    main()
