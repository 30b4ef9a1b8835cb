"""Judging results: `metrics` (PSNR-Y, SSIM-Y), `methods` (one runner for sd and the classical methods),
`compare` (side-by-side grids with zoomed crops) and `evaluate` (a folder, every method, a report)."""
