"""A model wrapper for failure tests: the real model, except that denoising a request whose prompt
contains FAIL raises, alone (denoise) or in a batch (denoise_batch, if any member's does)."""


class FaultyModel:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def denoise(self, latents, token_range, cond, start, end, request, group=None, on_step=None):
        if "FAIL" in request.prompt:
            raise RuntimeError("injected fault")
        return self._inner.denoise(
            latents, token_range, cond, start, end, request, group=group, on_step=on_step
        )

    def denoise_batch(self, items, token_range, group=None, on_step=None):
        if any("FAIL" in it.request.prompt for it in items):
            raise RuntimeError("injected fault")
        return self._inner.denoise_batch(items, token_range, group=group, on_step=on_step)
