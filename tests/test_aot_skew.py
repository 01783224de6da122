"""AoT table backward on skewed ids, and AoT's training step without host syncs (issue #11).

- The chunked segment sum (kernels/aot.py): one row holding 50% / 99% / 100% of the tokens, segments
  of exactly K = segment_chunk() tokens and K ± 1, prime N, d = 1 and odd d, every dtype pair,
  against float64 and bit for bit against the documented order (segment_sums_kernel_order), the
  same bits run to run, every buffer poisoned with NaN; the plan's chunk table against an
  independent loop; empty (padded) segments write zero rows; rows outside the output are never
  written.
- AoTBias.capture without torch.unique: the logits and gradients of the unique-based capture it
  replaced, bit for bit; no host sync in a training step after one warm-up step; a bad id is
  rejected by the embedding while AoT's own indexing stays in bounds.
"""
import math

import pytest
import torch

import peftops
from helpers import assert_close, device_backend_params, force_backend, poison_fresh_buffers, tiny_batch, tiny_llama
from host_sync import count_host_syncs
from peftops import aot
from peftops.aot import AoTConfig
from peftops.kernels import HAS_TRITON, interpreting
from peftops.kernels import aot as K

CHUNK = K.segment_chunk()
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and interpreting()),
                                       reason="runs the kernels in triton's CPU interpreter")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _ids_from_counts(counts, seed=0) -> torch.Tensor:
    """Token ids, id i repeated counts[i] times, in a random order (so the sort has work to do)."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]


def _skewed_ids(n, vocab, share, seed=0) -> torch.Tensor:
    """n ids of which round(share * n) are id 0, the rest uniform over [1, vocab)."""
    g = torch.Generator().manual_seed(seed)
    heavy = round(share * n)
    rest = torch.randint(1, vocab, (n - heavy,), generator=g) if n > heavy else torch.zeros(0, dtype=torch.long)
    ids = torch.cat([torch.zeros(heavy, dtype=torch.long), rest])
    return ids[torch.randperm(n, generator=g)]


# (name, ids, d): the heavy segment spans many chunks, one chunk exactly, or one more / one less
LAYOUTS = [
    ("50%-prime", lambda: _skewed_ids(97, 31, 0.5), 5),
    ("99%", lambda: _skewed_ids(101, 7, 0.99), 1),
    ("100%", lambda: _skewed_ids(5 * CHUNK - 3, 1, 1.0), 67),
    ("K,K+1,K-1,2K+1,1", lambda: _ids_from_counts([CHUNK, CHUNK + 1, CHUNK - 1, 2 * CHUNK + 1, 1]), 7),
    ("uniform", lambda: _skewed_ids(61, 53, 0.0), 64),
]
# (grad dtype, table-gradient dtype): every grad dtype into its own, 16-bit grads into fp32 / fp64 tables,
# fp64 grads rounded once into 16-bit tables
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
          (torch.float64, torch.bfloat16), (torch.float64, torch.float16)]
CASES = [(lay, torch.float32, torch.float32) for lay in LAYOUTS] + [
    (lay, g, o) for lay in (LAYOUTS[0], LAYOUTS[3]) for g, o in DTYPES[1:]]


def _tol_dtype(grad_dtype, out_dtype):
    """The coarser of the accumulation dtype and the stored dtype."""
    acc = torch.float64 if grad_dtype == torch.float64 else torch.float32
    return out_dtype if out_dtype.itemsize < acc.itemsize else acc


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout,grad_dtype,out_dtype", CASES,
                         ids=[f"{c[0][0]}-{str(c[1])[6:]}-{str(c[2])[6:]}" for c in CASES])
def test_skewed_table_backward_matches_float64_and_its_documented_order(device, backend, layout, grad_dtype,
                                                                        out_dtype, monkeypatch):
    _, make_ids, d = layout
    ids = make_ids().to(device)
    n = ids.numel()
    V = int(ids.max()) + 3  # two rows no token reads
    g = torch.Generator().manual_seed(n)
    grad = (torch.randn(n, d, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))).to(grad_dtype).to(device)
    want = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids.cpu(), grad.cpu().double())
    occurring = torch.unique(ids.cpu())
    longest = int(torch.bincount(ids.cpu()).max())
    poison_fresh_buffers(monkeypatch)  # outputs and the chunk partials' scratch start as NaN
    with force_backend(backend):
        runs = [aot.aot_table_grad(grad, ids, V, dtype=out_dtype) for _ in range(2)]
        dense = K.table_grad_dense(grad, ids, (V, d), dtype=out_dtype)
    rows, sums = runs[0]
    assert torch.equal(rows.cpu(), occurring) and sums.dtype == out_dtype
    assert_close(sums, want[occurring], dtype=_tol_dtype(grad_dtype, out_dtype), scale=longest ** 0.5)
    assert torch.equal(_bits(runs[1][1]), _bits(sums)), "two runs must give the same bits"
    assert torch.equal(_bits(dense[rows]), _bits(sums))
    others = torch.ones(V, dtype=torch.bool)
    others[occurring] = False
    assert torch.equal(dense[others.to(device)], torch.zeros(int(others.sum()), d, dtype=out_dtype, device=device))
    # the kernels' order, as documented: chunks token by token, then chunk sums (bf16 stores are
    # left out under the interpreter, which truncates fp32 -> bf16; bf16 grads into fp32 are in)
    if backend == "triton" and not (out_dtype == torch.bfloat16 and interpreting()):
        exact = K.round_once(K.segment_sums_kernel_order(grad, K.segment_plan(ids)), out_dtype)
        assert torch.equal(_bits(sums), _bits(exact))


def _chunk_tables_by_loop(counts, seg_rows, n):
    """The plan's chunk and reduce tables, built entry by entry from the layout's description."""
    u = len(counts)
    n_chunks, n_reduce = n // CHUNK + u, n // (CHUNK + 1)
    starts = [sum(counts[:s]) for s in range(u)]
    order = sorted(range(u), key=lambda s: (-counts[s], s))
    chunks, reduce = [], []
    for s in order:
        m = max(1, -(-counts[s] // CHUNK))
        if m > 1:
            reduce.append((len(chunks), m, s, seg_rows[s]))
        for j in range(m):
            chunks.append((starts[s] + j * CHUNK, max(0, min(CHUNK, counts[s] - j * CHUNK)), s, seg_rows[s], int(m > 1)))
    assert len(chunks) <= n_chunks and len(reduce) <= n_reduce
    chunks += [(0, 0, -1, -1, 0)] * (n_chunks - len(chunks))
    reduce += [(0, 0, -1, -1)] * (n_reduce - len(reduce))
    return [list(col) for col in zip(*chunks)], [list(col) for col in zip(*reduce)] if reduce else [[]] * 4


@pytest.mark.parametrize("counts", [[1], [CHUNK], [CHUNK + 1, 2], [3, 2 * CHUNK + 5, CHUNK - 1, CHUNK, 1],
                                    [2, 0, CHUNK + 2, 0, 0], [0, 5]],
                         ids=lambda c: ",".join(map(str, c)))
def test_plan_chunk_table_is_the_documented_layout(counts):
    n = sum(counts)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(len(counts)))
    seg_rows = [3 * s + 1 for s in range(len(counts))]  # ascending, not the segment index
    plan = K.pack_plan(perm, torch.tensor(seg_rows), torch.tensor(counts))
    u = len(counts)
    assert K.plan_num_segments(plan, n) == u and plan.dtype == torch.int64
    assert torch.equal(plan[:n + 2 * u], torch.cat([perm, torch.tensor(seg_rows), torch.tensor(counts)]))
    chunks, reduce = _chunk_tables_by_loop(counts, seg_rows, n)
    got_chunks, got_reduce = K._chunk_tables(plan, n)
    assert got_chunks.tolist() == chunks
    assert got_reduce.tolist() == (reduce if got_reduce.numel() else [[]] * 4)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_padded_plan_writes_every_row_of_a_per_batch_table(device, backend, dtype, monkeypatch):
    """The training step's plan: M = min(N, V) segments, the last M - U empty. Every row is written
    (no zero fill): the real ones with their sums, the empty ones with zeros."""
    ids = _ids_from_counts([2 * CHUNK + 3, 1, CHUNK, 4], seed=3)
    n, d, u = ids.numel(), 11, 4
    m = 9  # the bound: 5 empty segments
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(n, d, generator=g).to(dtype).to(device)
    perm = torch.sort(ids, stable=True)[1]
    counts = torch.cat([torch.bincount(ids), torch.zeros(m - u, dtype=torch.long)])
    plan = K.pack_plan(perm, torch.arange(m), counts).to(device)
    want = torch.zeros(m, d, dtype=torch.float64).index_add_(0, ids, grad.cpu().double())
    poison_fresh_buffers(monkeypatch)
    with force_backend(backend):
        dense = K.table_grad_dense(grad, ids.to(device), (m, d), dtype=dtype, plan=plan, validate=False)
    assert_close(dense, want, dtype=dtype, scale=n ** 0.5)
    assert torch.equal(dense[u:].cpu(), torch.zeros(m - u, d, dtype=dtype))
    K.check_plan(plan, ids.to(device), None, m, values=False)  # its shape is a plan's
    with pytest.raises(ValueError, match=r"^plan: .*segment counts are not >= 1"):  # not aot_segment_plan's
        K.check_plan(plan, ids.to(device), None, m, values=True)


@needs_interpreter
def test_rows_outside_the_table_are_never_written():
    """Unvalidated ids outside [0, V): their segments' rows lie outside the output; the kernels mask
    those stores (the output here is a view inside a larger buffer whose other rows must survive)."""
    V, d = 5, 9
    ids = torch.cat([_ids_from_counts([CHUNK + 2, 0, 3, 1, 2]), torch.tensor([-1, V, V, -1, V + 7])])
    n = ids.numel()
    grad = torch.randn(n, d, generator=torch.Generator().manual_seed(6))
    big = torch.full((V + 2, d), 7.0)
    plan = K.segment_plan(ids)
    K._launch_segment_sum(grad, plan, K.plan_num_segments(plan, n), big[1:V + 1], True)
    assert torch.equal(big[0], torch.full((d,), 7.0)) and torch.equal(big[V + 1], torch.full((d,), 7.0))
    ok = (ids >= 0) & (ids < V)
    want = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids[ok], grad[ok].double())
    hit = torch.unique(ids[ok])
    assert_close(big[1:V + 1][hit], want[hit], scale=n ** 0.5)
    with force_backend("triton"):  # the public op, unvalidated: the same rows, nothing else
        dense = K.table_grad_dense(grad, ids, (V, d), validate=False)
    assert torch.equal(dense[hit], big[1:V + 1][hit])


@needs_interpreter
def test_both_passes_launch_with_fp_fusion_off(monkeypatch):
    """tests/test_kernel_hazards_sift_aot.py checks _segment_sum_kernel; the reduce pass only runs for
    segments longer than one chunk, which that test's inputs do not have."""
    seen = {}
    for name in ("_segment_sum_kernel", "_segment_reduce_kernel"):
        kernel = getattr(K, name)
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            seen.setdefault(_name, set()).add(kwargs.get("enable_fp_fusion", "unset"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    ids = _ids_from_counts([2 * CHUNK + 1, 3])
    with force_backend("triton"):
        K.table_grad_rows(torch.randn(ids.numel(), 5), ids, 2)
    assert seen == {"_segment_sum_kernel": {False}, "_segment_reduce_kernel": {False}}


# ----------------------------------------------------------------------------------------------
# AoTBias.capture: no torch.unique, the same results
# ----------------------------------------------------------------------------------------------
def _unique_capture(self, ids):
    """The capture this change replaced: torch.unique (U on the host: a sync every forward)."""
    rt = self._rt
    rt.ids = ids
    if self.compiled:
        return
    uniq, inv, counts = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True, return_counts=True)
    rt.uniq, rt.inv = uniq, inv.view(ids.shape)
    rt.features = self.features(uniq)
    if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
        perm = torch.argsort(inv, stable=True)
        rt.plan = K.pack_plan(perm, torch.arange(uniq.numel(), device=ids.device), counts)
    else:
        rt.plan = None


def _aot_llama(reparam, seed=0, **kw):
    model = peftops.apply(tiny_llama(train=True, seed=seed), AoTConfig(reparam=reparam, rank=3, **kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in aot.get_aot(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _step_results(model, batch):
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reparam", ["kron", "fc", "direct"])
def test_capture_without_unique_gives_the_same_bits(backend, reparam, monkeypatch):
    """Per-batch table sized by the bound M = min(N, V) (rows past U read by no token): the same
    logits and parameter gradients as the torch.unique capture, bit for bit, for repeated ids and
    every id once. Except fc's b2: its gradient is a column sum over the table's M rows instead
    of U (the extra terms are exact zeros, but torch's blocked reduction regroups the sum), equal
    to fp32 rounding (docs/design.md#aot-kernels)."""
    model = _aot_llama(reparam)
    vocab = model.config.vocab_size
    batches = [tiny_batch("llama", vocab=vocab, seed=1),  # 14 tokens, repeats
               {"input_ids": torch.tensor([[5, 5, 5, 5, 5, 2, 5]]), "labels": torch.tensor([[5, 5, 5, 5, 5, 2, 5]])},
               {"input_ids": torch.arange(vocab).view(1, -1)[:, :16].flip(1),
                "labels": torch.arange(vocab).view(1, -1)[:, :16]}]
    with force_backend(backend):
        new = [_step_results(model, b) for b in batches]
        monkeypatch.setattr(aot.AoTBias, "capture", _unique_capture)
        old = [_step_results(model, b) for b in batches]
    for (logits, grads), (logits0, grads0) in zip(new, old):
        assert torch.equal(logits, logits0)
        assert grads.keys() == grads0.keys() and grads
        for name in grads:
            if name.endswith("out_bias"):
                assert_close(grads[name], grads0[name], dtype=torch.float32, msg=name)
            else:
                assert torch.equal(grads[name], grads0[name]), name


def _step_counters(opt) -> list:
    return [st["step"] for st in opt.state.values() if isinstance(st.get("step"), torch.Tensor)]


def _train(model, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@needs_interpreter
@pytest.mark.parametrize("reparam", ["kron", "fc", "direct"])
def test_aot_training_step_has_no_host_sync(reparam):
    """After one warm-up step, forward + backward + AdamW step on the Triton path read nothing back
    (the optimizer's step counters are host-resident by design)."""
    model = _aot_llama(reparam)
    g = torch.Generator().manual_seed(5)
    batches = [tiny_batch("llama", vocab=model.config.vocab_size, generator=g) for _ in range(3)]
    with force_backend("triton"):
        opt = _train(model, batches[:1])
        with count_host_syncs(allow=_step_counters(opt)) as log:
            for batch in batches[1:]:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert not log.events, log.report(log.events)
        # the check can fail: the torch.unique capture this replaced is seen
        with count_host_syncs(allow=_step_counters(opt)) as old:
            _unique_capture(aot.get_aot(model), batches[1]["input_ids"])
        seen = [what for what, _ in old.events]
        assert "aten._unique2" in seen and set(seen) <= {"torch.unique", "aten._unique2"}, seen


@needs_interpreter
def test_multi_task_serving_forward_has_no_host_sync():
    model = _aot_llama("kron")
    tables = aot.materialize_aot_tables(model, torch.float32)
    aot.set_aot_tables(model, [tables, -tables, 2 * tables])
    ids = tiny_batch("llama", vocab=model.config.vocab_size, n=3, seed=2)["input_ids"]
    with force_backend("triton"), aot.aot_tasks(model, torch.tensor([2, 0, 1])), torch.no_grad():
        want = model(ids).logits
        with count_host_syncs() as log:
            got = model(ids).logits
    assert not log.events, log.report(log.events)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# bad input_ids in the model: no range check of AoT's own, nothing out of bounds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bad_input_ids_raise_and_aot_stays_in_bounds(backend, compiled):
    """The word embedding's own lookup rejects a bad id (IndexError on CPU; on a GPU a device-side
    assert, as in the plain model); AoT's capture, which runs before it, indexes with clamped ids:
    its per-batch rows and plan lie inside their tables. Nothing of the model changes and the next
    forward gives the same logits as before."""
    model = _aot_llama("kron")
    if compiled:
        aot.compile_aot_tables(model, torch.float32)
    owner = aot.get_aot(model)
    vocab = model.config.vocab_size
    good = tiny_batch("llama", vocab=vocab, seed=3)["input_ids"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with force_backend(backend):
        want = model(good, labels=good).logits.detach()
        for bad_id in (vocab, -2, 10 ** 9):
            bad = good.clone()
            bad[1, 3] = bad_id
            with pytest.raises(IndexError, match="index out of range"):
                model(bad, labels=bad)
            if not compiled:
                rt = owner._rt
                m = min(bad.numel(), vocab)
                assert rt.uniq.shape == (m,) and 0 <= int(rt.uniq.min()) and int(rt.uniq.max()) < vocab
                assert 0 <= int(rt.inv.min()) and int(rt.inv.max()) < m
                assert K.plan_num_segments(rt.plan, bad.numel()) == m
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            torch.testing.assert_close(model(good, labels=good).logits.detach(), want, atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2])
def test_capture_handles_tiny_batches(n):
    """N = 1 and N < V: the bound M = min(N, V) is N."""
    model = _aot_llama("kron")
    ids = torch.arange(n).view(1, n) + 3
    with force_backend("reference"):
        out = model(ids, labels=ids)
        out.loss.backward()
    assert torch.isfinite(out.logits).all()
    rt = aot.get_aot(model)._rt
    assert rt.uniq.numel() == n and rt.plan is not None


def test_sizes_are_host_bounds():
    """plan_sizes: chunk slots >= the chunks of any layout of N tokens in U segments, reduce slots
    >= the segments longer than one chunk, scratch >= their chunks (worst cases checked here)."""
    for n in [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 7 * CHUNK + 3]:
        for u in {1, 2, min(n, 5), n}:
            c, r, s = K.plan_sizes(n, u)
            worst_multi = [n - (u - 1)] + [1] * (u - 1)  # one long segment
            spread = [n // u + (i < n % u) for i in range(u)]  # all as long as possible
            for counts in (worst_multi, spread):
                chunks = sum(max(1, math.ceil(x / CHUNK)) for x in counts)
                multi = [x for x in counts if x > CHUNK]
                assert chunks <= c and len(multi) <= r and sum(math.ceil(x / CHUNK) for x in multi) <= s
