"""Named workload mixes for `gfdit bench gen --mix` and `gfdit eval sweep --mix`.

The paper's evaluation (GF-DiT, arXiv 2606.13501, as defined by its public code) uses three classes at
50 denoising steps:

    class  priority  alpha  preemptible  paper-image   paper-video (height x width x frames)
    S      100       1.5    no           512 x 512     480 x 832 x 49
    M      50        2.0    no           1024 x 1024   480 x 832 x 81
    L      0         6.0    yes          1536 x 1536   720 x 1280 x 81

deadline = arrival + alpha * the class's standalone latency on one rank. The classes are equally
likely (weight 1 each): the paper's code fixes sizes, priorities and alphas; equal weights are our
choice, recorded in every trace's meta ("spec.classes").
"""

from __future__ import annotations

from gfdit.bench.workload import RequestClass

__all__ = ["kMixSteps", "MIXES", "available_mixes", "mix_classes"]

kMixSteps = 50  # denoising steps of every class of the paper's mixes

# name -> (is_video, ((class, width, height, frames, priority, alpha, preemptible), ...))
MIXES: dict[str, tuple[bool, tuple[tuple[str, int, int, int | None, int, float, bool], ...]]] = {
    "paper-image": (
        False,
        (
            ("S", 512, 512, None, 100, 1.5, False),
            ("M", 1024, 1024, None, 50, 2.0, False),
            ("L", 1536, 1536, None, 0, 6.0, True),
        ),
    ),
    "paper-video": (
        True,
        (
            ("S", 832, 480, 49, 100, 1.5, False),
            ("M", 832, 480, 81, 50, 2.0, False),
            ("L", 1280, 720, 81, 0, 6.0, True),
        ),
    ),
}


def available_mixes() -> list[str]:
    return sorted(MIXES)


def mix_classes(name: str, video: bool | None = None) -> tuple[RequestClass, ...]:
    """The request classes of mix `name`. With `video` (the served model is a video model or not),
    ValueError if the mix is of the other kind."""
    if name not in MIXES:
        raise ValueError(f"unknown mix {name!r}; available: {', '.join(available_mixes())}")
    is_video, rows = MIXES[name]
    if video is not None and video != is_video:
        kind = "video" if is_video else "image"
        raise ValueError(
            f"mix {name!r} is a {kind} mix; the model is {'a video' if video else 'an image'} model"
        )
    return tuple(
        RequestClass(c, w, h, f, kMixSteps, 1.0, priority=p, alpha=a, preemptible=pre)
        for c, w, h, f, p, a, pre in rows
    )
