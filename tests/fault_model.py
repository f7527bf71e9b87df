"""Model wrappers for failure tests: the real model, with a hook run before every denoise and
denoise_batch (with the requests it is about to step)."""


class ModelWrapper:
    """Delegates everything to `inner`; subclasses override `before(requests)`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def before(self, requests) -> None:
        pass

    def denoise(self, latents, token_range, cond, start, end, request, group=None, on_step=None):
        self.before([request])
        return self._inner.denoise(
            latents, token_range, cond, start, end, request, group=group, on_step=on_step
        )

    def denoise_batch(self, items, token_range, group=None, on_step=None):
        self.before([it.request for it in items])
        return self._inner.denoise_batch(items, token_range, group=group, on_step=on_step)


class FaultyModel(ModelWrapper):
    """Denoising a request whose prompt contains FAIL raises, alone or in a batch (if any member's does)."""

    def before(self, requests) -> None:
        if any("FAIL" in r.prompt for r in requests):
            raise RuntimeError("injected fault")
