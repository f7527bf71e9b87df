"""Where the simulator's latency error comes from, per policy and load, from a fidelity run's task logs
(gfdit eval fidelity writes "by_request" in fidelity.json: the mean per request of the wait before the
first task, the tasks' durations, the gaps between tasks and, measured only, what follows the last
task; gfdit.eval.tasks). Writes a markdown table to stdout:
    python bench/fidelity_parts.py OUT_DIR        (OUT_DIR holds load*/fidelity.json)
"""

import glob
import json
import os
import sys


def ms(x) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def main(out: str) -> None:
    print(
        "| load | policy | wait meas / sim | tasks meas / sim | gaps meas / sim | last end meas / sim | after meas / sim |"
    )
    print("| ---: | --- | --- | --- | --- | --- | ---: |")
    for path in sorted(glob.glob(os.path.join(out, "load*", "fidelity.json"))):
        load = os.path.basename(os.path.dirname(path))[len("load") :]
        for run in json.load(open(path))["runs"]:
            b = run.get("by_request")
            if not b:
                print(f"| {load} | {run['policy']} | no task log | | | | |")
                continue
            m, s = b["measured"], b["simulated"]
            cells = [f"{ms(m[k])} / {ms(s[k])}" for k in ("wait_s", "tasks_s", "gaps_s", "end_s")]
            after = f"{ms(m.get('after_s'))} / {ms(s.get('after_s'))}"
            print(f"| {load} | {run['policy']} | {' | '.join(cells)} | {after} |")


if __name__ == "__main__":
    main(sys.argv[1])
