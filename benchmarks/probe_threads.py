"""Where the time of one `bs.sinkhorn` solve goes at one and at two threads (n = 1024, eps = 0.01,
float64, the default Anderson acceleration): torch profiler over ten solves, the heaviest
operators per solve, and the wall time. Behind the thread-scaling reading in benchmarks/README.md:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_threads.py 1
    PYTHONPATH=lib .venv/bin/python benchmarks/probe_threads.py 2
"""
import sys
import time

import torch

import bistochastic as bs
from bistochastic.bench import make_problem

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
C, a, b = make_problem(1024, torch.float64, "cpu")


def solve():
    return bs.sinkhorn(C, 0.01, a, b, tol=1e-6, max_iter=100000, grad="none", warn=False)


for _ in range(3):
    solve()
with torch.profiler.profile() as prof:
    for _ in range(10):
        solve()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
print(f"{torch.get_num_threads()} thread(s): operators {total / 10 / 1e3:.2f} ms per solve")
for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
    print(f"  {e.key:<26} {e.self_cpu_time_total / 10 / 1e3:6.2f} ms per solve "
          f"{e.count // 10:5d} calls")
t = time.perf_counter()
for _ in range(10):
    solve()
print(f"  wall {(time.perf_counter() - t) / 10 * 1e3:.2f} ms per solve")
