"""Can the one-pass sweep of the scaling engine use two threads at n = 1024 (float64)? Behind the
thread-scaling reading in benchmarks/README.md. Not a test; run on a quiet two-core machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_two_thread_sweep.py

One sweep is the row update ``u = a / E v`` and the column product ``Eᵀ u``. Timed, interleaved,
minimum of 5 rounds of 50 sweeps:

* ``two GEMVs``: two full matrix-vector products (what the engine runs on two threads);
* ``one-pass, B KiB``: the engine's blocked sweep (rows in blocks of about B KiB, each block read
  from memory once and re-read from cache), with torch's two-thread operators;
* ``halves as a batch``: the same, the two halves of the rows as a batch of two (``bmm``), in the
  hope that the batch is split across the threads;
* ``two Python threads``: each thread sweeps half the rows with one-thread operators (torch
  releases the GIL inside an operator), the partial column products summed.

Then the cost of the Anderson loop's vector bookkeeping (the NumPy operations of one iteration,
m = 1024): alone; right after the two matrix-vector products of an iteration, which stream the
8 MiB kernel through the core's caches; after those products and a first run of the bookkeeping,
which refills the caches; and after a 1 ms sleep.
"""
import threading
import time

import numpy as np
import torch

n = m = 1024
torch.manual_seed(0)
E = torch.rand(n, m, dtype=torch.float64)
a = torch.full((n,), 1.0 / n, dtype=torch.float64)
v = torch.rand(m, dtype=torch.float64) + 0.5


def two_gemv():
    u = a / torch.mv(E, v)
    return u, torch.mv(E.t(), u)


def one_pass(rows):
    blocks = [(i, min(i + rows, n)) for i in range(0, n, rows)]
    views = [(E[i0:i1], E[i0:i1].t(), a[i0:i1]) for i0, i1 in blocks]
    u = torch.empty(n, dtype=torch.float64)
    us = [u[i0:i1] for i0, i1 in blocks]

    def sweep():
        w = torch.zeros(m, dtype=torch.float64)
        for (Eb, Ebt, ab), ub in zip(views, us):
            torch.div(ab, torch.mv(Eb, v), out=ub)
            w.addmv_(Ebt, ub)
        return u, w
    return sweep


def halves_as_batch(rows):
    E3, a3 = E.view(2, n // 2, m), a.view(2, n // 2)
    blocks = [(i, min(i + rows, n // 2)) for i in range(0, n // 2, rows)]
    views = [(E3[:, i0:i1], E3[:, i0:i1].transpose(1, 2), a3[:, i0:i1]) for i0, i1 in blocks]
    u3 = torch.empty(2, n // 2, dtype=torch.float64)
    us = [u3[:, i0:i1] for i0, i1 in blocks]
    v3 = v.view(1, m, 1).expand(2, m, 1)

    def sweep():
        w = torch.zeros(2, m, 1, dtype=torch.float64)
        for (Eb, Ebt, ab), ub in zip(views, us):
            torch.div(ab, torch.bmm(Eb, v3).squeeze(-1), out=ub)
            w.baddbmm_(Ebt, ub.unsqueeze(-1))
        return u3.view(n), w.sum(0).squeeze(-1)
    return sweep


class TwoPythonThreads:
    def __init__(self, rows=64):
        blocks = [(i, min(i + rows, n)) for i in range(0, n, rows)]
        self.views = [(E[i0:i1], E[i0:i1].t(), a[i0:i1]) for i0, i1 in blocks]
        self.u = torch.empty(n, dtype=torch.float64)
        self.us = [self.u[i0:i1] for i0, i1 in blocks]
        self.half = len(blocks) // 2
        self.ws = [torch.zeros(m, dtype=torch.float64) for _ in range(2)]
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        threading.Thread(target=self._worker, daemon=True).start()

    def _part(self, t):
        w = self.ws[t]
        w.zero_()
        for j in (range(self.half) if t == 0 else range(self.half, len(self.views))):
            Eb, Ebt, ab = self.views[j]
            torch.div(ab, torch.mv(Eb, v), out=self.us[j])
            w.addmv_(Ebt, self.us[j])

    def _worker(self):
        while True:
            self.go.acquire()
            self._part(1)
            self.done.release()

    def __call__(self):  # torch's thread count is 1 (process-wide): one-thread operators
        self.go.release()
        self._part(0)
        self.done.acquire()
        return self.u, self.ws[0] + self.ws[1]


# torch.set_num_threads is process-wide and costly to switch (switching it at every sweep costs
# more than a sweep): each thread count is timed in a block of its own
# (two threads first: while a Python thread that has run torch operators lives, even blocked,
# torch's two-thread products run 1.6x slower on this machine; the worker starts last)
def two_thread_block():
    methods = {"two GEMVs": two_gemv}
    for kib in (256, 512, 1024, 2048):
        rows = kib * 1024 // (m * 8)
        methods[f"one-pass {kib} KiB"] = one_pass(rows)
        methods[f"halves as a batch, {kib} KiB"] = halves_as_batch(rows // 2)
    return methods


def one_thread_block():
    return {"two GEMVs": two_gemv, "one-pass 512 KiB": one_pass(64),
            "two Python threads, one-pass 512 KiB": TwoPythonThreads(64)}


_, w_ref = two_gemv()
print(f"one sweep at n = {n}, float64, interleaved, minimum of 5 x 50 (ms)")
for threads, block in ((2, two_thread_block), (1, one_thread_block)):
    torch.set_num_threads(threads)
    methods = block()
    for name, f in methods.items():
        _, w = f()
        assert torch.allclose(w, w_ref), name
    best = {}
    for _ in range(5):
        for name, f in methods.items():
            t0 = time.perf_counter()
            for _ in range(50):
                f()
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / 50)
    for name, t in best.items():
        print(f"  torch threads {threads}: {name:38s} {t * 1e3:6.3f}")

# the bookkeeping of one Anderson iteration (NumPy, as the engine runs it on the CPU)
mem = 12
rng = np.random.default_rng(0)
DT, DR = rng.standard_normal((m, mem)), rng.standard_normal((m, mem))
x, b = rng.standard_normal(m), rng.random(m) + 0.1
logb = np.log(b)
Ktu, u = torch.rand(m, dtype=torch.float64) + 0.1, torch.rand(m, dtype=torch.float64) + 0.1
T_prev, R_prev = rng.standard_normal(m), rng.standard_normal(m)


def bookkeeping():
    vv = torch.from_numpy(np.exp(x))
    K, uu = Ktu.numpy(), u.numpy()
    err = np.abs(vv.numpy() * K - b).sum(-1)
    Tx = logb - np.log(K)
    [float(err.max()), float(np.abs(Tx).max()), float(np.abs(np.log(uu)).max())]
    R = Tx - x
    DT[..., 3] = Tx - T_prev
    DR[..., 3] = R - R_prev
    dRt = DR.swapaxes(-1, -2)
    gamma = np.linalg.solve(dRt @ DR + 1e-12 * np.eye(mem), dRt @ R[..., None])
    return Tx - (DT @ gamma)[..., 0]


torch.set_num_threads(1)


def gemvs():
    torch.mv(E, v), torch.mv(E.t(), v)


def gemvs_then_bookkeeping():  # the caches refilled by a first run
    gemvs()
    bookkeeping()


for label, before in (("alone", None), ("after two GEMVs", gemvs),
                      ("after two GEMVs and a first run", gemvs_then_bookkeeping),
                      ("after a 1 ms sleep", lambda: time.sleep(1e-3))):
    ts = []
    for _ in range(300):
        if before is not None:
            before()
        t0 = time.perf_counter()
        bookkeeping()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"Anderson bookkeeping of one iteration, {label:32s}: min {ts[0] * 1e6:4.0f} us, "
          f"median {ts[150] * 1e6:4.0f} us")
