"""The model: find it (`hub`, no torch), decide where each part runs and in which precision (`placement`),
stream weights into that precision (`weights`), load and check the parts (`loading`); `random_model` builds
tiny or full-size models with random weights in diffusers layout for tests and benchmarks.

Nothing here is imported by `import sdx4`; `errors` holds the exceptions every entry point catches."""
