"""Where each request's data lives between tasks, held in the request's record on rank 0.

The scheduler tracks the latent's Layout (gfdit.scheduler, Note [State layout between tasks]); a
Placement adds what the engine must know to build a task's command and to survive a lost rank:
which ranks hold a copy of the text conditioning (and its tensors' shapes), which hold the
latent's slices, and every rank that may hold anything of the request (to
release it there).

Note [Conditioning copies]
~~~~~~~~~~~~~~~~~~~~~~~~~~
ENCODE leaves the text conditioning replicated on its group. A later DENOISE or DECODE on a group
with members that lack it carries (holder, member) copies in its command: holders inside the new
group send first, else any holder; the members then hold it too. Copies are never dropped before
the request ends, so the set of holders only grows (or shrinks by lost ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfdit.layout import ReshardPlan
from gfdit.tasks import TaskKind

from . import messages as msg

__all__ = ["Placement"]


@dataclass
class Placement:
    """Where one request's data lives (rank 0's view)."""

    cond_holders: set[int] = field(default_factory=set)  # ranks with a full copy of the conditioning
    cond_meta: tuple[msg.TensorMeta, ...] = ()  # its tensors, in name order (from ENCODE's Done)
    latent_ranks: tuple[int, ...] = ()  # the group whose members hold the latent's slices
    touched: set[int] = field(default_factory=set)  # ranks that may hold anything of it

    def command_fields(self, kind: TaskKind, ranks: tuple[int, ...], plan: ReshardPlan | None):
        """The data-movement fields of a Task command for `kind` on `ranks` and the ranks that take
        part (members and senders). Records the conditioning copies it orders (Note [Conditioning
        copies]) and the ranks touched."""
        fields: dict = {}
        involved = set(ranks)
        # A plan that sends nothing still goes out when the layout changes (e.g. a mirrored layout to
        # plain SP on the same ranks: each keeps a part of what it holds, Note [Reshard execution]).
        moves = plan is not None and (not plan.is_noop or plan.src != plan.dst)
        if moves:
            fields["transfers"] = tuple((t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.transfers)
            fields["local"] = tuple((t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.local)
            involved |= {t.src_rank for t in plan.transfers}
        if kind in (TaskKind.DENOISE, TaskKind.DECODE):
            lacking = [m for m in ranks if m not in self.cond_holders]
            if lacking and self.cond_holders:
                inside = [h for h in ranks if h in self.cond_holders]
                pool = inside or sorted(self.cond_holders)
                fields["cond_sends"] = tuple((pool[i % len(pool)], m) for i, m in enumerate(lacking))
                fields["cond_meta"] = self.cond_meta
                involved |= {s for s, _ in fields["cond_sends"]}
                self.cond_holders |= set(lacking)
        self.touched |= involved
        return fields, involved

    def on_done(self, kind: TaskKind, ranks: tuple[int, ...], cond_meta=None) -> None:
        """A task finished on `ranks`: where the request's data lives now. `cond_meta`: ENCODE's
        conditioning tensors."""
        if kind is TaskKind.ENCODE:
            self.cond_holders = set(ranks)
            self.cond_meta = tuple(cond_meta or ())
        if kind in (TaskKind.ENCODE, TaskKind.DENOISE):
            self.latent_ranks = ranks
        elif kind is TaskKind.DECODE:
            self.latent_ranks = ()  # the request has ended

    def needs_rerun(self, rank: int) -> bool:
        """Whether losing `rank` loses state this request cannot do without: a latent slice or the
        last copy of the conditioning."""
        if rank in self.latent_ranks:
            return True
        return bool(self.cond_holders) and self.cond_holders <= {rank}

    def drop_rank(self, rank: int) -> None:
        """`rank` is gone: nothing lives there any more (call after needs_rerun said no)."""
        self.cond_holders.discard(rank)
        self.touched.discard(rank)
