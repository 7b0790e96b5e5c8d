"""``fedlora simulate --task sft`` (DESIGN §6.1), on tiny random LLaMA / Qwen2 models
(`fedlora.testing.random_causal_lm`) and, marked slow, on the real SmolLM2-135M-Instruct.

- the response-only loss against a naive computation (full logits, shift, mask, mean per
  segment) and a float64 oracle, forward and adapter gradients; the encoding (chat template,
  labels, truncation and left-out counts); the LM head applied only at response positions;
- batched = sequential, resume, client sampling: whole runs compared within the run's own
  rounding floor (see `assert_runs_agree`), never a fixed atol;
- bad input: one line on stderr, exit code 2, before any training, nothing written;
- GPU (marked ``gpu``): a bf16 base with float32 adapters and optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import types
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from numerics import EPS32, assert_as_accurate
from torch import nn

from fedlora.cli import main
from fedlora.layers.lora import LoRALinear
from fedlora.methods import get as get_method
from fedlora.simulate import SimConfig, parse_budgets, run
from fedlora.simulate import engine as engine_mod
from fedlora.simulate.config import ConfigError
from fedlora.simulate.engine import ClientJob, sample_clients, set_segments, train_group
from fedlora.simulate.tasks import sft
from fedlora.simulate.tasks.sft import IGNORE, LMBatch, SFTTask, encode_examples

transformers = pytest.importorskip("transformers")

EPS_BF16 = torch.finfo(torch.bfloat16).eps
ROW_METRICS = ("test_loss", "test_perplexity", "train_loss")
SCORE_METRICS = ("rouge_l", "exact_match")
EXACT_KEYS = ("round", "bytes_up", "bytes_down", "clients_used", "rejected", "sampled")
CSV_COLUMNS = [
    "round", "test_perplexity", "test_loss", "rouge_l", "exact_match", "train_loss",
    "aggregation_error", "bytes_up", "bytes_down", "clients_used", "seconds",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models gain little from a second one, and on a busy 2-core
    machine OpenMP's waiting threads spin (measured beside another process: a tiny run took 38 s
    on two threads and 0.8 s on one; the SmolLM2 test 218 s and 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sft_cfg(model: str, **kw) -> SimConfig:
    """A run that takes about a second on 2 CPU cores: 3 clients, 2 rounds of 2 steps, 6 test
    examples of which 2 are answered greedily with at most 3 tokens."""
    base = dict(
        task="sft", model=model, clients=3, rounds=2, local_steps=2, batch_size=3,
        max_length=48, max_test=6, max_generate=2, max_new_tokens=3, rank=4, heads=2, lr=1e-2,
        device="cpu", dtype="float32",
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def quiet_run(cfg: SimConfig, out=None, **kw):
    return run(cfg, out, progress=False, log=lambda line: None, **kw)


def build(model_dir: str, slots: int, **kw):
    """``(lm, tokenizer, cfg, rule)``: the SFT task's model with ``slots`` adapter slots."""
    from fedlora.models import load_causal_lm

    cfg = sft_cfg(model_dir, **kw)
    rule = get_method(cfg.method).client(cfg.client_options(), parse_budgets(cfg))
    lm, tok = SFTTask().build_model(cfg, None, slots, rule, load_causal_lm(model_dir))
    return lm, tok, cfg, rule


def randomise_adapters(lm: nn.Module, gen: torch.Generator) -> None:
    """Random A and B in every slot (B starts at zero, which would make A's gradient zero)."""
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.3)


def adapter_params(lm: nn.Module) -> list[nn.Parameter]:
    return [p for p in lm.parameters() if p.requires_grad]


# ------------------------------------------------------------------ the naive loss and oracle
def random_lm_batch(
    gen: torch.Generator, vocab: int, prompt_lens: list[int], resp_lens: list[int], pad: int = 3
) -> LMBatch:
    """Right-padded random sequences: ``prompt_lens[i]`` prompt tokens, then ``resp_lens[i]``
    response tokens (the labels), then ``pad`` or more padding columns holding random ids (a
    loss that read them would change)."""
    n = len(prompt_lens)
    width = max(p + r for p, r in zip(prompt_lens, resp_lens, strict=True)) + pad
    ids = torch.randint(4, vocab, (n, width), generator=gen)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens, strict=True)):
        mask[i, : p + r] = 1
        labels[i, p : p + r] = ids[i, p : p + r]
    return LMBatch(ids, mask, labels, torch.zeros(n, dtype=torch.long))


def naive_segment_losses(
    model: nn.Module, batch: LMBatch, offsets: list[int], *, unmasked: bool = False
) -> torch.Tensor:
    """The textbook computation: every position's logits (``model(input_ids).logits``), shifted
    by one, cross-entropy where the *label* is a response token, mean per segment. With
    ``unmasked`` the targets are the next input tokens wherever they are not padding (what an
    implementation that forgot to mask the prompt would compute)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].double()
    if unmasked:
        target = torch.where(batch.attention_mask[:, 1:] == 1, batch.input_ids[:, 1:], IGNORE)
    else:
        target = batch.labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    keep = (target != IGNORE).double()
    out = []
    for t in range(len(offsets) - 1):
        a, b = offsets[t], offsets[t + 1]
        out.append((nll[a:b] * keep[a:b]).sum() / keep[a:b].sum())
    return torch.stack(out)


class NaiveLoRA64(nn.Module):
    """A float64 LoRA layer written from the formula, with no fedlora op:
    ``y = x Wᵀ + b + scale · ((x A_sᵀ) ⊙ m_s) B_sᵀ``, ``s`` the slot of the row's segment."""

    def __init__(self, layer: LoRALinear, router: dict) -> None:
        super().__init__()
        base = layer.base_layer
        self.register_buffer("weight", base.weight.detach().double().clone())
        bias = getattr(base, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().double().clone())
        self.A = nn.Parameter(layer.lora_A.detach().double().clone())
        self.B = nn.Parameter(layer.lora_B.detach().double().clone())
        self.register_buffer("mask", layer.rank_mask.detach().double().clone())
        self.scale, self.router = layer.scale, router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.router["row_slot"]
        h = torch.einsum("nld,nrd->nlr", x, self.A[s]) * self.mask[s][:, None, :]
        return F.linear(x, self.weight, self.bias) + self.scale * torch.einsum(
            "nlr,nor->nlo", h, self.B[s]
        )


def float64_copy(lm: nn.Module) -> tuple[nn.Module, dict, list[nn.Parameter]]:
    """``lm`` in float64 with every LoRA layer replaced by `NaiveLoRA64`; its router (set
    ``row_slot``) and its A, B parameters in the order of ``adapter_params(lm)``."""
    m = copy.deepcopy(lm)
    router: dict = {}
    params = []
    for name, module in list(m.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            naive = NaiveLoRA64(module, router)
            setattr(m.get_submodule(parent), child, naive)
            params += [naive.A, naive.B]
    m = m.double()
    return m, router, params


def row_slots(offsets: list[int], slots: list[int]) -> torch.Tensor:
    return torch.cat(
        [torch.full((offsets[t + 1] - offsets[t],), s) for t, s in enumerate(slots)]
    ).long()


def tolerance(plain: torch.Tensor, oracle: torch.Tensor, factor: float = 4.0) -> float:
    """The bound `numerics.assert_as_accurate` applies (factor x the plain float32 error)."""
    floor = float((plain.double() - oracle.double()).abs().max())
    return factor * max(floor, 4 * EPS32 * float(oracle.abs().max()))


# (prompt lengths, response lengths, segment offsets, slot of each segment): odd batch and
# segment sizes, a one-token prompt, one-token responses, one slot serving two segments
# (PreLort's truncations). (A lone one-token prompt with a one-token response would make every
# query gradient exactly zero: one position attends to itself alone, whatever its query.)
LOSS_CASES = [
    ([1], [2], [0, 1], [0]),
    ([3, 1, 7, 2, 5], [1, 4, 2, 6, 1], [0, 2, 5], [2, 0]),
    ([5, 9, 1, 4, 2, 8, 3], [2, 1, 5, 3, 7, 1, 4], [0, 1, 4, 7], [1, 1, 0]),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("head_only", [True, False], ids=["head-at-responses", "full-logits"])
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_segment_losses_equal_the_naive_masked_loss(
    tiny_llm_dir, tiny_qwen2_dir, monkeypatch, arch, head_only, case
):
    """`SFTTask.segment_losses` (and `response_token_losses` under it) equal the naive masked
    loss, forward and gradients w.r.t. every slot's A and B, as accurately as the naive float32
    computation is (float64 oracle: the same model with the formula's LoRA); ``full-logits``
    is the path for models whose head has a transformation after it."""
    prompt_lens, resp_lens, offsets, slots = LOSS_CASES[case]
    lm, _, _, _ = build(tiny_llm_dir if arch == "llama" else tiny_qwen2_dir, slots=3)
    if not head_only:  # LLaMA / Qwen2 ignore it, but a scaled head must take the other path
        monkeypatch.setattr(lm.config, "logit_scale", 1.0, raising=False)
    head_inputs: list[int] = []
    hook = lm.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: head_inputs.append(args[0].dim())
    )
    gen = torch.Generator().manual_seed(100 + case)
    randomise_adapters(lm, gen)
    batch = random_lm_batch(gen, lm.config.vocab_size, prompt_lens, resp_lens)
    weights = torch.rand(len(slots), generator=gen, dtype=torch.float64) + 0.5
    params = adapter_params(lm)
    set_segments(lm, torch.tensor(offsets), torch.tensor(slots))

    got = torch.stack(SFTTask().segment_losses(lm, batch, offsets))
    hook.remove()
    assert head_inputs == [2 if head_only else 3]  # response rows only / every position
    assert got.dtype == torch.float32 and got.shape == (len(slots),)
    got_grads = torch.autograd.grad((got.double() * weights).sum(), params)
    plain = naive_segment_losses(lm, batch, offsets)
    plain_grads = torch.autograd.grad((plain * weights).sum(), params)

    m64, router, params64 = float64_copy(lm)
    router["row_slot"] = row_slots(offsets, slots)
    oracle = naive_segment_losses(m64, batch, offsets)
    oracle_grads = torch.autograd.grad((oracle * weights).sum(), params64)

    assert_as_accurate(got.detach(), plain.detach(), oracle.detach(), what="segment losses")
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    for name, g, pg, og in zip(names, got_grads, plain_grads, oracle_grads, strict=True):
        assert og.abs().max() > 0, f"{name}: the oracle gradient is zero, the test checks nothing"
        assert_as_accurate(g, pg, og, what=f"d loss / d {name}")
    used = sorted(set(slots))
    for name, g in zip(names, got_grads, strict=True):  # slots nobody uses get no gradient
        unused = [s for s in range(3) if s not in used]
        assert torch.all(g[unused] == 0), name

    # the same per-token losses straight from response_token_losses
    nll, rows = sft.response_token_losses(lm, batch)
    assert nll.shape == rows.shape == (sum(resp_lens),)
    assert rows.tolist() == [i for i, r in enumerate(resp_lens) for _ in range(r)]
    set_segments(lm, None, None)


def test_an_unmasked_loss_would_fail(tiny_llm_dir):
    """Long prompts, short responses: the loss over every next token differs from the
    response-only loss by orders of magnitude more than the float32 tolerance, so the test
    above fails an implementation that does not mask the prompt (or the padding)."""
    lm, _, _, _ = build(tiny_llm_dir, slots=1)
    gen = torch.Generator().manual_seed(7)
    randomise_adapters(lm, gen)
    batch = random_lm_batch(gen, lm.config.vocab_size, [12, 10, 11], [1, 2, 1])
    offsets = [0, 1, 3]
    with torch.no_grad():
        got = torch.stack(SFTTask().segment_losses(lm, batch, offsets))
        plain = naive_segment_losses(lm, batch, offsets)
        unmasked = naive_segment_losses(lm, batch, offsets, unmasked=True)
        m64, router, _ = float64_copy(lm)
        router["row_slot"] = torch.zeros(3, dtype=torch.long)
        oracle = naive_segment_losses(m64, batch, offsets)
    tol = tolerance(plain, oracle)
    assert float((got.double() - oracle).abs().max()) <= tol
    assert float((got.double() - unmasked).abs().min()) > 1e3 * tol
    # the padding columns hold random ids: other random ids there change nothing
    poisoned = LMBatch(
        torch.where(batch.attention_mask == 1, batch.input_ids, 5),
        batch.attention_mask,
        batch.labels,
        batch.categories,
    )
    with torch.no_grad():
        again = torch.stack(SFTTask().segment_losses(lm, poisoned, offsets))
    assert float((again.double() - oracle).abs().max()) <= tol


# ------------------------------------------------------------------------------ the encoding
def _chat_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _example(instruction: str, output: str, category: str = "addition") -> dict:
    return {"instruction": instruction, "input": "", "output": output, "category": category}


def test_encode_examples_labels_and_chat_template(tiny_llm_dir):
    from fedlora.data import build_arithmetic, to_chat_messages
    from fedlora.models import load_causal_lm

    _, tok = load_causal_lm(tiny_llm_dir)
    data = build_arithmetic(per_category=2)
    extra = {"instruction": "What is 19 * 3?", "input": "5 and 7", "output": "57", "category": "x"}
    examples = [*data.examples, extra]
    cats = list(range(len(examples)))
    batch, prompts, kept, counts = encode_examples(tok, examples, cats, 64)
    assert counts == {"examples": len(examples), "truncated": 0, "dropped": 0}
    assert kept == list(range(len(examples))) and batch.categories.tolist() == cats
    assert batch.input_ids.shape == (len(examples), 64)
    for j, ex in enumerate(examples):
        p = _chat_ids(tok, to_chat_messages(ex, include_response=False), add_generation_prompt=True)
        full = _chat_ids(tok, to_chat_messages(ex))
        assert prompts[j] == p  # generation starts from exactly these tokens
        assert full[: len(p)] == p  # (the template renders the prompt alike inside the whole)
        n = len(full)
        assert batch.input_ids[j, :n].tolist() == full
        assert batch.attention_mask[j].tolist() == [1] * n + [0] * (64 - n)
        # -100 exactly on the prompt and the padding; the response tokens elsewhere
        assert batch.labels[j, : len(p)].eq(IGNORE).all()
        assert batch.labels[j, n:].eq(IGNORE).all()
        assert batch.labels[j, len(p) : n].tolist() == full[len(p) :]
        assert batch.labels[j, len(p) : n].ne(IGNORE).all()
        # the response is the answer and the end-of-turn token
        assert tok.decode(full[len(p) :]).startswith(ex["output"])
        assert tok.convert_tokens_to_ids("<|im_end|>") in full[len(p) :]


def test_encode_examples_truncates_and_leaves_out_with_counts(tiny_llm_dir):
    from fedlora.data import to_chat_messages
    from fedlora.models import load_causal_lm

    _, tok = load_causal_lm(tiny_llm_dir)

    def prompt_len(ex):
        return len(
            _chat_ids(tok, to_chat_messages(ex, include_response=False), add_generation_prompt=True)
        )

    def resp(ex):
        return _chat_ids(tok, to_chat_messages(ex))[prompt_len(ex) :]

    def instruction(n_words: int) -> str:
        return " ".join(["What"] * n_words)

    fixed = prompt_len(_example(instruction(1), "1")) - 1  # template tokens around the words
    L = 14

    def with_prompt(n: int, output: str) -> dict:
        ex = _example(instruction(n - fixed), output)
        assert prompt_len(ex) == n
        return ex

    examples = [
        with_prompt(8, "1 2 3 4 5 6 7 8 9"),  # 8 + 10 > 14: response cut to 6 tokens
        with_prompt(L, "5"),  # the prompt fills max_length: left out
        with_prompt(L - 2, "5"),  # 12 + 2 = 14: fits exactly, not truncated
        with_prompt(L - 1, "1 2"),  # 13 + 3 > 14: one response token left, truncated
        with_prompt(L + 5, "5"),  # longer than max_length: left out
        with_prompt(9, "7"),  # fits
    ]
    batch, prompts, kept, counts = encode_examples(tok, examples, [0] * 6, L)
    assert counts == {"examples": 6, "truncated": 2, "dropped": 2}
    assert kept == [0, 2, 3, 5]
    assert batch.input_ids.shape == (4, L) and len(prompts) == 4
    n_resp = (batch.labels != IGNORE).sum(1).tolist()
    assert n_resp == [L - 8, 2, 1, 2]
    for j, i in enumerate(kept):
        p, r = prompt_len(examples[i]), resp(examples[i])
        assert batch.labels[j, p : p + n_resp[j]].tolist() == r[: n_resp[j]]  # the first tokens
    # the SFT task notes what it cut and left out (the log line of a run)
    task = SFTTask()
    cfg = sft_cfg(tiny_llm_dir, max_length=L, max_test=0)
    split = types.SimpleNamespace(examples=examples, labels=[0] * 6)
    train, test = task.encode(tok, split, cfg), task.encode(tok, split, cfg, test=True)
    assert train.stats == counts and test.batch.stats == counts
    note = task.data_note(train, test)
    assert "2 of 6 responses truncated, 2 prompts longer than --max-length left out" in note
    assert test.references == [examples[i]["output"] for i in kept]


def test_a_response_that_encodes_to_nothing_is_refused(tiny_llm_dir):
    from fedlora.models import load_causal_lm

    _, tok = load_causal_lm(tiny_llm_dir)
    tok.chat_template = None  # the plain prompt: the response is the output and the EOS token
    tok.eos_token = None
    with pytest.raises(ConfigError, match="example 1's response encodes to no tokens"):
        encode_examples(tok, [_example("What is 2 + 3?", "5"), _example("What?", " ")], [0, 0], 32)


def test_truncation_counts_are_recorded_in_metrics_json(tiny_llm_dir, tmp_path):
    """metrics.json's ``data`` holds, per split, the counts `encode_examples` reports for the
    same examples and --max-length (and the per-client example counts of the partition)."""
    import json

    cfg = sft_cfg(tiny_llm_dir, rounds=1, local_steps=1, max_length=14)
    quiet_run(cfg, tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())["data"]
    task = SFTTask()
    dataset = task.load_data(cfg)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llm_dir)
    for split, examples in (("train", dataset.train), ("test", dataset.test)):
        ex = list(examples.examples)[: cfg.max_test if split == "test" else None]
        *_, counts = encode_examples(tok, ex, [0] * len(ex), cfg.max_length)
        assert data[split] == counts, split
    assert data["train"]["truncated"] > 0 and data["train"]["dropped"] > 0
    assert sum(data["clients"]) == data["train"]["examples"] - data["train"]["dropped"]


def test_a_run_logs_the_truncation_counts(tiny_llm_dir):
    lines: list[str] = []
    run(sft_cfg(tiny_llm_dir, rounds=1, local_steps=1, max_length=14), progress=False,
        log=lines.append)  # fmt: skip
    note = [line for line in lines if line.startswith("data: ")]
    assert len(note) == 1 and "responses truncated" in note[0], lines
    assert "prompts longer than --max-length left out" in note[0]


# --------------------------------------------------------------- the LM head, response rows only
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_head_sees_only_response_rows_in_a_training_step(tiny_llm_dir, tiny_qwen2_dir, arch):
    """A training step (`train_group`, two clients, two steps, odd batch sizes) runs the LM head
    on exactly the positions that predict a response token, not on every position."""
    lm, tok, cfg, rule = build(tiny_llm_dir if arch == "llama" else tiny_qwen2_dir, slots=2,
                               clients=2, local_steps=2)  # fmt: skip
    task = SFTTask()
    train = task.encode(tok, task.load_data(cfg).train, cfg)
    budgets = parse_budgets(cfg)
    from fedlora.state_dict import get_adapter_state_dict

    start = get_adapter_state_dict(lm, slot=0)
    batches = [[[0, 1, 2], [3, 4, 5, 6, 7]], [[8], [9, 10, 11]]]
    jobs = [
        ClientJob(k, budgets[k], batches[k], rule.download(start, budgets[k]), seed=k)
        for k in range(2)
    ]
    seen: list[tuple[int, ...]] = []
    head = lm.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        _, losses = train_group(lm, rule, jobs, train, cfg, 0, task)
    finally:
        handle.remove()
    # on CPU every client's batch is its own pass (fedlora.local.train_slots): step by step,
    # client by client
    expected = [
        int((train.take(batches[k][s]).labels != IGNORE).sum()) for s in range(2) for k in range(2)
    ]
    assert seen == [(n, lm.config.hidden_size) for n in expected]
    positions = [
        len(batches[k][s]) * (int(train.take(batches[k][s]).attention_mask.sum(1).max()) - 1)
        for s in range(2)
        for k in range(2)
    ]
    assert all(n < p for n, p in zip(expected, positions, strict=True))
    assert sum(expected) < sum(positions) / 2
    assert all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------- whole runs: the rounding floor
def _untrimmed_cat(self, batches):
    return LMBatch.cat(batches)  # padded to --max-length: the same function, other widths


def _reversed_batches(*args, **kwargs):
    return [list(reversed(b)) for b in _CLIENT_BATCHES(*args, **kwargs)]


_CLIENT_BATCHES = engine_mod.client_batches


def floor_run(cfg: SimConfig, out=None, **kw):
    """The sequential engine once more on the same mathematics in another summation order:
    every client batch's examples reversed and padded to --max-length. How far it lands from
    the plain sequential run is this machine's float32 rounding noise for this run."""
    cfg = copy.deepcopy(cfg)
    cfg.engine = "sequential"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "client_batches", _reversed_batches)
        mp.setattr(SFTTask, "cat", _untrimmed_cat)
        return quiet_run(cfg, out, **kw)


def assert_runs_agree(
    got, plain, oracle, *, eps: float = EPS32, factor: float = 8.0, scores: bool = True
) -> None:
    """``got`` is as close to ``oracle`` as ``plain`` is, within ``factor`` (the rule of
    `numerics.assert_as_accurate`, DESIGN §7), metric by metric and tensor by tensor.

    ``plain`` is another evaluation of the same run in the same dtype (`floor_run`) or, for a
    low-precision run, the sequential run in that dtype with ``oracle`` the float32 run.

    - Metrics (test loss and perplexity, train loss): the floor is ``plain``'s largest error
      over the rounds, and at least 4 float32 ulps of the metric (they are float32/float64 means
      over many tokens in every dtype).
    - The global state, tensor by tensor, in the max norm and in the Frobenius norm, each
      relative to the tensor's norm: the floor is pooled over the tensors and is at least 4
      ulps of ``eps`` (the base's dtype). Pooling matters: Adam turns rounding-sized
      differences of near-zero gradients into step-sized ones on single elements, so a tensor
      whose floor happened to be exactly zero must not make its bound zero. The Frobenius norm
      is the one that stays informative under bf16, where such sign flips make the max norm's
      floor a large part of the tensor.

    ``scores``: the greedy answers' scores are equal too (not across dtypes: bf16 flips
    near-tied argmaxes)."""
    assert len(got.rounds) == len(oracle.rounds) == len(plain.rounds)
    for key in ROW_METRICS:
        o = torch.tensor([r[key] for r in oracle.rounds], dtype=torch.float64)
        p = torch.tensor([r[key] for r in plain.rounds], dtype=torch.float64)
        g = torch.tensor([r[key] for r in got.rounds], dtype=torch.float64)
        assert torch.isfinite(g).all(), (key, g)
        tol = factor * max(float((p - o).abs().max()), 4 * EPS32 * float(o.abs().max()))
        err = float((g - o).abs().max())
        assert err <= tol, f"{key}: {g.tolist()} vs {o.tolist()}: {err:.3g} > {tol:.3g}"
    for r_g, r_o in zip(got.rounds, oracle.rounds, strict=True):
        for key in EXACT_KEYS:
            assert r_g.get(key) == r_o.get(key), key
        for key in SCORE_METRICS:  # greedy answers: equal unless a near-tie flips an argmax
            assert math.isfinite(r_g[key]), key
            if scores:
                assert r_g[key] == pytest.approx(r_o[key]), key
    assert got.global_state.keys() == oracle.global_state.keys() == plain.global_state.keys()
    norms = {"max": lambda t: t.abs().max(), "Frobenius": torch.linalg.vector_norm}

    def rel(t: torch.Tensor, o: torch.Tensor, norm) -> float:
        return float(norm(t.double() - o.double())) / (float(norm(o.double())) or 1.0)

    for what, norm in norms.items():
        floor = max(
            [4 * eps]
            + [rel(plain.global_state[k], o, norm) for k, o in oracle.global_state.items()]
        )
        for k, o in oracle.global_state.items():
            err = rel(got.global_state[k], o, norm)
            assert err <= factor * floor, (
                f"{k}: relative {what}-norm difference {err:.3g} exceeds {factor} x the "
                f"rounding floor {floor:.3g}"
            )


ENGINE_CASES = [
    ("llama", dict(method="fedit")),
    ("qwen2", dict(method="fedit")),
    ("llama", dict(method="hafl", budgets="components=1,2,4")),
    ("llama", dict(method="ravan", budgets="heads=1,2")),
    ("qwen2", dict(method="prelort", budgets="rank=1,2,4")),
    ("llama", dict(method="fedit", clients=5, clients_per_round=2, rounds=3)),
]


@pytest.mark.parametrize(
    "arch,kw",
    ENGINE_CASES,
    ids=["fedit-llama", "fedit-qwen2", "hafl-llama", "ravan-llama", "prelort-qwen2",
         "fedit-sampled"],
)  # fmt: skip
def test_batched_engine_equals_sequential(tiny_llm_dir, tiny_qwen2_dir, arch, kw):
    model = tiny_llm_dir if arch == "llama" else tiny_qwen2_dir
    seq = quiet_run(sft_cfg(model, engine="sequential", **kw))
    bat = quiet_run(sft_cfg(model, engine="batched", **kw))
    assert_runs_agree(bat, floor_run(sft_cfg(model, **kw)), seq)
    # the round-0 evaluation is the same untrained model in both
    assert bat.initial["test_loss"] == pytest.approx(seq.initial["test_loss"], rel=16 * EPS32)
    # and training did something: the test loss moved off the initial one, adapters trained
    assert bat.rounds[-1]["test_loss"] != bat.initial["test_loss"]
    trained = [v for k, v in bat.global_state.items() if k.endswith((".lora_B.weight", "lora_H"))]
    assert trained and all(v.abs().sum() > 0 for v in trained)


# ------------------------------------------------------------------------------------ resume
def _csv_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_a_kill_gives_the_uninterrupted_run(tiny_llm_dir, tmp_path, monkeypatch):
    cfg = sft_cfg(tiny_llm_dir, rounds=3, method="hafl", budgets="components=1,2,4")
    full = quiet_run(cfg, tmp_path / "full")

    def killed(model, rule, jobs, data, cfg_, round_idx, task=None):
        if round_idx == 1:  # round 2 is training: the process is killed
            raise KeyboardInterrupt
        return train_group(model, rule, jobs, data, cfg_, round_idx, task)

    part = tmp_path / "part"
    with monkeypatch.context() as mp:
        mp.setattr(engine_mod, "train_group", killed)
        with pytest.raises(KeyboardInterrupt):
            quiet_run(copy.deepcopy(cfg), part)
    rows = _csv_rows(part / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1"]  # round 1 was checkpointed
    killed_initial_seconds = float(rows[0]["seconds"])

    evaluations = []
    real_eval = engine_mod.evaluate_global
    monkeypatch.setattr(
        engine_mod, "evaluate_global", lambda *a: evaluations.append(1) or real_eval(*a)
    )
    resumed = quiet_run(copy.deepcopy(cfg), part, resume=True)
    monkeypatch.undo()
    assert len(evaluations) == 2  # rounds 2 and 3; round 0 is kept from the checkpoint, not redone
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    assert resumed.initial["seconds"] == pytest.approx(killed_initial_seconds)
    for key in ("test_loss", "test_perplexity", *SCORE_METRICS):
        assert resumed.initial[key] == pytest.approx(full.initial[key], rel=16 * EPS32)
    assert_runs_agree(resumed, floor_run(cfg), full)

    for out in (tmp_path / "full", part):
        with open(out / "metrics.csv", newline="") as f:
            assert next(csv.reader(f)) == CSV_COLUMNS
        rows = _csv_rows(out / "metrics.csv")
        assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
        assert float(rows[0]["test_loss"]) == pytest.approx(full.initial["test_loss"], rel=1e-6)
        assert rows[0]["train_loss"] == ""  # nothing trained before round 1
        for r in rows:
            for col in ("test_perplexity", "test_loss", "rouge_l", "exact_match"):
                assert math.isfinite(float(r[col])), (col, r)
            assert float(r["test_perplexity"]) == pytest.approx(math.exp(float(r["test_loss"])))
        samples = _jsonl(out / "samples.jsonl")
        assert [s["round"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]  # max_generate 2
        assert all(
            set(s) == {"round", "prompt", "question", "answer", "reference"} for s in samples
        )
        meta = json.loads((out / "metrics.json").read_text())
        assert meta["initial"]["test_loss"] == pytest.approx(full.initial["test_loss"])
        assert meta["config"]["task"] == "sft"
    full_samples = _jsonl(tmp_path / "full" / "samples.jsonl")
    assert [(s["prompt"], s["reference"]) for s in _jsonl(part / "samples.jsonl")] == [
        (s["prompt"], s["reference"]) for s in full_samples
    ]
    assert not [p.name for p in part.iterdir() if p.name.startswith(".")]  # no temp files left


# ----------------------------------------------------------------------------- client sampling
def test_sample_clients_is_seeded_by_seed_and_round():
    cfg = SimConfig(task="sft", clients=7, clients_per_round=3, seed=5)
    rng = torch.get_rng_state()
    later_first = sample_clients(cfg, 6)
    draws = [sample_clients(cfg, r) for r in range(8)]
    assert torch.equal(torch.get_rng_state(), rng)  # no global random state used or consumed
    assert draws[6] == later_first  # whatever was drawn before
    for d in draws:
        assert len(d) == 3 and d == sorted(set(d)) and all(0 <= c < 7 for c in d)
    assert len({tuple(d) for d in draws}) > 1  # the clients change from round to round
    again = SimConfig(task="sft", clients=7, clients_per_round=3, seed=5)
    assert [sample_clients(again, r) for r in range(8)] == draws
    other = SimConfig(task="sft", clients=7, clients_per_round=3, seed=6)
    assert [sample_clients(other, r) for r in range(8)] != draws
    assert sample_clients(SimConfig(clients=7), 0) == list(range(7))
    assert sample_clients(SimConfig(clients=7, clients_per_round=7), 3) == list(range(7))


def test_batched_engine_holds_k_slots_and_trains_the_sampled_clients(tiny_llm_dir, monkeypatch):
    slots, groups = [], []
    real_build = SFTTask.build_model

    def spy_build(self, cfg, dataset, num_slots, rule, preloaded=None):
        lm, tok = real_build(self, cfg, dataset, num_slots, rule, preloaded)
        layer = next(m for m in lm.modules() if isinstance(m, LoRALinear))
        slots.append((num_slots, layer.lora_A.shape[0]))
        return lm, tok

    def spy_train(model, rule, jobs, data, cfg, round_idx, task=None):
        groups.append((round_idx, [j.client for j in jobs]))
        return train_group(model, rule, jobs, data, cfg, round_idx, task)

    monkeypatch.setattr(SFTTask, "build_model", spy_build)
    monkeypatch.setattr(engine_mod, "train_group", spy_train)
    cfg = sft_cfg(tiny_llm_dir, clients=5, clients_per_round=2, rounds=3, local_steps=1)
    result = quiet_run(cfg)
    assert slots == [(2, 2)]  # K slots, not one per client
    for r, row in enumerate(result.rounds):
        assert row["sampled"] == sample_clients(cfg, r) and row["clients_used"] == 2
    assert groups == [(r, sample_clients(cfg, r)) for r in range(3)]  # one group of K per round


@pytest.mark.parametrize(
    "k,clients,words",
    [(4, 3, "--clients-per-round 4 exceeds --clients 3"),
     (0, 3, "--clients-per-round must be a positive integer"),
     (-1, 3, "--clients-per-round must be a positive integer")],
)  # fmt: skip
def test_clients_per_round_out_of_range(tiny_llm_dir, tmp_path, capsys, k, clients, words):
    with pytest.raises(ConfigError, match=words):
        SimConfig(task="sft", clients=clients, clients_per_round=k).validate()
    out = tmp_path / "out"
    argv = ["--clients", str(clients), "--clients-per-round", str(k)]
    code, err = _cli(capsys, tiny_llm_dir, out, *argv)
    _assert_refused(code, err, words)
    assert not out.exists()


# ---------------------------------------------------------------------------------- bad input
TINY_CLI = ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2",
            "--max-length", "48", "--max-test", "4", "--max-generate", "1",
            "--max-new-tokens", "2", "--rank", "2", "--device", "cpu", "--no-progress"]  # fmt: skip


def _cli(capsys, model, out, *argv: str) -> tuple[int, str]:
    code = main(["simulate", "--task", "sft", "--model", str(model), "--out", str(out),
                 *TINY_CLI, *argv])  # fmt: skip
    return code, capsys.readouterr().err.strip()


def _assert_refused(code: int, err: str, words: str) -> None:
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr(engine_mod, "train_group", refuse)


def _jsonl_file(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "case",
    ["encoder", "missing-model", "no-fields", "empty-response", "cuda", "bf16", "max-length",
     "task", "max-new-tokens"],
)  # fmt: skip
def test_bad_input_exits_2_before_training(
    tiny_llm_dir, tiny_bert_dir, tmp_path, capsys, monkeypatch, no_training, case
):
    model, argv = tiny_llm_dir, []
    ok = {"instruction": "What is 2 + 3?", "output": "5"}
    if case == "encoder":
        model, words = tiny_bert_dir, "is not a causal language model"
    elif case == "missing-model":
        model, words = tmp_path / "no-such-model", "does not exist"
    elif case == "no-fields":
        data = _jsonl_file(tmp_path, "d.jsonl", [{"text": "hello", "label": "a"}] * 4)
        argv, words = ["--data", str(data)], "expected the keys instruction and output"
    elif case == "empty-response":
        data = _jsonl_file(tmp_path, "d.jsonl", [ok, ok, {"instruction": "Why?", "output": "  "}])
        argv, words = ["--data", str(data)], "line 3: empty output (the response)"
    elif case == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv, words = ["--device", "cuda"], "--device cuda: no CUDA GPU is available"
    elif case == "bf16":
        from fedlora.simulate import devices

        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
        argv, words = ["--dtype", "bfloat16"], "--dtype bfloat16: this CPU has no native bf16"
    elif case == "max-length":  # the shortest arithmetic prompt is 11 tokens long
        argv, words = ["--max-length", "8"], "--max-length 8: every training prompt is at least"
    elif case == "task":
        argv, words = ["--task", "bogus"], "argument --task: invalid choice: 'bogus'"
    else:
        argv, words = ["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"
    out = tmp_path / "out"
    code, err = _cli(capsys, model, out, *argv)
    _assert_refused(code, err, words)
    if case in ("no-fields", "empty-response"):
        assert "--data" in err and "d.jsonl" in err
    assert not out.exists()


def test_cli_sft_run_writes_the_task_outputs(tiny_llm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["simulate", "--task", "sft", "--model", tiny_llm_dir, "--out", str(out),
                 *TINY_CLI]) == 0  # fmt: skip
    done = capsys.readouterr().out.splitlines()[-1]
    assert done.startswith("done: fedit final") and "rouge" in done.lower(), done
    with open(out / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == CSV_COLUMNS
    assert [r["round"] for r in _csv_rows(out / "metrics.csv")] == ["0", "1"]
    assert [s["round"] for s in _jsonl(out / "samples.jsonl")] == [0, 1]
    for name in ("metrics.json", "checkpoint.safetensors"):
        assert (out / name).stat().st_size > 0


# ------------------------------------------------------------------- the real SmolLM2 (slow)
@pytest.fixture(scope="module")
def smollm2_lm():
    from fedlora import models

    try:
        models.embedded_llm_gguf()
        models._require_gguf_loading()
    except ImportError as err:
        pytest.skip(f"embedded SmolLM2 unavailable: {err}")
    return models.load_causal_lm("smollm2")


@pytest.mark.slow
def test_smollm2_answers_and_one_round_lowers_the_test_loss(smollm2_lm):
    from fedlora.data import to_chat_messages

    lm, tok = smollm2_lm
    questions = ["What is the capital of France?", "What is 2 + 2?"]
    prompts = []
    for q in questions:
        messages = to_chat_messages(_example(q, "-"), include_response=False)
        prompts.append(_chat_ids(tok, messages, add_generation_prompt=True))
    # the task's prompt ids (its rendered prompt tokenized alone) are the chat template's
    _, task_prompts, _, _ = encode_examples(tok, [_example(q, "x") for q in questions], [0, 0], 256)
    assert task_prompts == prompts
    answers = sft.greedy_answers(lm, tok, prompts, max_new_tokens=16)
    assert "Paris" in answers[0], answers
    assert "4" in answers[1], answers

    cfg = SimConfig(task="sft", clients=2, rounds=1, local_steps=1, batch_size=2, max_test=8,
                    max_generate=2, max_new_tokens=8)  # fmt: skip
    result = run(cfg, None, progress=False, log=lambda line: None, shared={"model": (lm, tok)})
    first = result.rounds[0]
    assert first["test_loss"] < result.initial["test_loss"], (result.initial, first)
    assert math.isfinite(first["rouge_l"]) and 0 <= first["exact_match"] <= 1


# --------------------------------------------------------------------- bf16 base (CPU and GPU)
def _bf16_device_params():
    from fedlora.simulate.devices import cpu_supports_bf16

    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16"),
    )
    return [cpu, pytest.param("cuda", marks=pytest.mark.gpu)]


@contextlib.contextmanager
def _spies(monkeypatch):
    """Record the models the SFT task builds and the optimizers the engine makes."""
    built, optimizers = [], []
    real_build = SFTTask.build_model

    def spy_build(self, *a, **k):
        out = real_build(self, *a, **k)
        built.append(out[0])
        return out

    import fedlora.optim as optim_mod

    class SpyAdamW(optim_mod.SlotAdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            optimizers.append(self)

    with monkeypatch.context() as mp:
        mp.setattr(SFTTask, "build_model", spy_build)
        mp.setattr(optim_mod, "SlotAdamW", SpyAdamW)  # fedlora.local makes its optimizers
        yield built, optimizers


@pytest.mark.parametrize("device", _bf16_device_params())
def test_bf16_base_keeps_adapters_and_optimizer_state_float32(tiny_llm_dir, monkeypatch, device):
    cfg = sft_cfg(tiny_llm_dir, device=device, dtype="bfloat16", rounds=1, local_steps=1)
    with _spies(monkeypatch) as (built, optimizers):
        result = quiet_run(cfg)
    (lm,) = built
    want = torch.device(device).type
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    layers = [m for m in lm.modules() if isinstance(m, LoRALinear)]
    assert layers
    for m in layers:
        assert m.base_layer.weight.dtype == torch.bfloat16
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
        assert m.lora_A.device.type == want
    frozen = [p for p in lm.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in adapter_params(lm))
    assert optimizers
    for opt in optimizers:
        for m, v in opt.state:
            assert m.dtype == v.dtype == torch.float32 and m.device.type == want
    assert all(v.dtype == torch.float32 for v in result.global_state.values())
    for row in (result.initial, *result.rounds):
        for key in ("test_loss", "test_perplexity", *SCORE_METRICS):
            assert math.isfinite(row[key]), (key, row)


@pytest.mark.gpu
@pytest.mark.parametrize("method,budgets", [("fedit", "uniform"), ("hafl", "components=1,2,4")])
def test_cuda_bf16_batched_equals_sequential(tiny_llm_dir, method, budgets):
    """On the GPU with a bf16 base (the Triton kernels), batched = sequential as accurately as
    bf16 allows: the batched run is within 4x the sequential bf16 run's distance from the
    float32 run (the oracle). (On a CPU with bf16 the two distances were within 1.4x; a client
    trained on another's batches was 17x off in the test loss and 4.5x in the state.)"""
    kw = dict(device="cuda", method=method, budgets=budgets)
    oracle = quiet_run(sft_cfg(tiny_llm_dir, engine="sequential", dtype="float32", **kw))
    seq = quiet_run(sft_cfg(tiny_llm_dir, engine="sequential", dtype="bfloat16", **kw))
    bat = quiet_run(sft_cfg(tiny_llm_dir, engine="batched", dtype="bfloat16", **kw))
    assert_runs_agree(bat, seq, oracle, eps=EPS_BF16, factor=4.0, scores=False)
