"""gfcoll-bench: a collectives microbenchmark modelled on nccl-tests, with its baseline in the same run.

Launch with torchrun (every rank runs it)::

    torchrun --nproc-per-node 4 -m gfcoll.bench -b 1K -e 256M -f 2 --ops all_reduce,all_gather \\
        --json out.json --plot plots/

For every collective, group and size it reports the latency of gfcoll and of torch.distributed on a
dedicated ``new_group`` with the same ranks (NCCL for CUDA tensors, gloo for CPU tensors), and the
cost of forming a group (gfcoll's ``world.group`` against ``new_group``, ``split_group`` and the
NCCL communicator init), as an aligned table, JSON, a markdown table and PNG plots.

Modules: ``__main__`` (options, validated before any collective), ``driver`` (sweep, warm-up,
iterations, timing, check), ``ops`` (one plugin per collective), ``formation`` (group formation
cost), ``report`` (environment, table, JSON, markdown, plots).

Timing. CUDA: a CUDA event pair around each iteration on the current stream (or, with --graph,
``iters`` operations captured in one CUDA graph and the replays timed); CPU: wall clock around each
iteration, each one started right after a barrier of the group. Warm-up iterations are excluded.
A rank's time is the median over its iterations; the reported time is the maximum over the group's
members (the slowest rank, as nccl-tests reports).

Bandwidth, as in nccl-tests (doc/PERFORMANCE.md there), with n the group size and S the size
column in bytes (the whole buffer of all_reduce/broadcast/sendrecv, the output of all_gather, the
input of reduce_scatter, the send buffer of all_to_all)::

    algbw = S / time
    busbw = algbw * factor
        all_reduce      2 (n - 1) / n
        all_gather      (n - 1) / n
        reduce_scatter  (n - 1) / n
        all_to_all      (n - 1) / n
        broadcast       1
        sendrecv        1        (a ring: each member sends S to the next, receives S from the previous)

busbw is comparable to the hardware's link bandwidth whatever n is. GB/s are 1e9 bytes per
second. ``ratio`` in the table is gfcoll's busbw over the baseline's (= baseline time / gfcoll
time): above 1, gfcoll is faster.
"""
