"""``--task sft``: federated instruction tuning of a causal language model (DESIGN §6.1).

Default: the embedded SmolLM2-135M-Instruct (`fedlora.models.load_causal_lm`) with LoRA on the
query and value projections, on the offline ``arithmetic`` instruction set; ``--data`` takes
``stdlib_qa``, ``reasoning_gym:<task>,...``, a JSONL/CSV file or a local Hugging Face dataset
(`fedlora.data.load_instructions`, with ``--data-split`` and ``--data-columns``), ``--model``
any local causal-LM folder. Clients are non-IID over the examples' categories (a warning when
the data has none). ``--system-prompt`` is a system message put first in every conversation,
in training and in evaluation.

**Encoding.** Each example is rendered with the tokenizer's chat template: the prompt (the user
turn, ``add_generation_prompt=True``) and the response (the rest of the rendered conversation:
the answer and the end-of-turn tokens). The two pieces are tokenized separately and joined, so
the loss sees exactly the prompt tokens generation starts from. A tokenizer without a chat
template gets ``"### Instruction:\\n...\\n\\n### Response:\\n"`` and the EOS token. Sequences
longer than ``--max-length`` are **truncated and counted**: the response is cut at the limit;
an example whose prompt alone fills the limit is left out (it has nothing to learn) and counted;
both counts are logged and recorded in ``metrics.json``.

**Loss.** Cross-entropy on response tokens only (the prompt and padding are masked), averaged
over each client's response tokens. The LM head (49,152 x 576 on SmolLM2, most of a 135M model's
compute on all positions) is applied only at the positions that predict a response token.

**Evaluation** of the global adapter each round: perplexity ``exp(mean NLL)`` and mean NLL over
the response tokens of the first ``--max-test`` test examples, and greedy generation (at most
``--max-new-tokens`` tokens) on the first ``--max-generate`` of them, scored by ROUGE-L and
exact match (:mod:`.scoring`; exact match by the data set's own verifier when it has one, as
reasoning-gym's tasks do); a few prompts (the full text the model was given, system prompt and
chat template included, and the last user turn as ``question``) with their answers go to
``samples.jsonl``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.simulate.config import ConfigError, SimConfig
from fedlora.simulate.tasks import model_device

IGNORE = -100
EVAL_BATCH = 16
#: prompts per round whose answers are written to samples.jsonl
NUM_SAMPLES = 4
PLAIN_PROMPT = "{bos}{system}### Instruction:\n{user}\n\n### Response:\n"


@dataclass
class LMBatch:
    """Right-padded token sequences ``[N, L]`` with response-only ``labels`` (-100 elsewhere)
    and each example's category (what the partition splits clients over)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    categories: torch.Tensor
    #: how the encoding went (``examples``, ``truncated``, ``dropped``); not carried by slices
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, idx: list[int] | torch.Tensor) -> LMBatch:
        i = torch.as_tensor(idx, dtype=torch.long)
        return LMBatch(
            self.input_ids[i], self.attention_mask[i], self.labels[i], self.categories[i]
        )

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.categories,
        )

    def trimmed(self) -> LMBatch:
        """Columns past the longest sequence removed (padding every row has)."""
        width = max(1, int(self.attention_mask.sum(1).max())) if len(self) else 1
        return LMBatch(
            self.input_ids[:, :width],
            self.attention_mask[:, :width],
            self.labels[:, :width],
            self.categories,
        )

    @staticmethod
    def cat(parts: list[LMBatch]) -> LMBatch:
        return LMBatch(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.categories for p in parts]),
        )


@dataclass
class SFTEval:
    """The test side: teacher-forced sequences for perplexity, the prompts to generate from
    (token ids, unpadded) with their reference answers, the tokenizer to decode with; for
    samples.jsonl each prompt's full text (system prompt and chat template included) and its
    last user turn; the test examples and the data set's own answer verifier (``scorer``,
    None: exact match against the reference)."""

    batch: LMBatch
    prompts: list[list[int]]
    references: list[str]
    questions: list[str]
    tokenizer: Any
    prompt_texts: list[str] = field(default_factory=list)
    examples: list[Mapping[str, Any]] = field(default_factory=list)
    scorer: Callable[[str, Mapping[str, Any]], float] | None = None

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def stats(self) -> dict[str, int]:
        """How the test split was encoded (see `LMBatch.stats`)."""
        return self.batch.stats


# ------------------------------------------------------------------------------------- data
def load_data(cfg: SimConfig) -> Any:
    """The instruction set of ``--data`` (default ``arithmetic``), read with ``--data-split``
    and ``--data-columns``; one warning line on stderr when the data has no categories (the
    non-IID partition then only skews the clients' sizes)."""
    from fedlora.data import load_instructions

    try:
        data = load_instructions(
            cfg.data or "arithmetic", seed=0, split=cfg.data_split, columns=cfg.data_columns
        )
    except (ValueError, OSError, ImportError) as err:
        raise ConfigError(f"--data: {err}") from None
    if data.info.get("categories") == "none":
        print(
            f"fedlora: warning: --data {cfg.data}: no example has a category, so all are in one "
            "and the non-IID (Dirichlet) partition only skews the clients' sizes; give each "
            "example a category (or map a column: --data-columns category=COLUMN)",
            file=sys.stderr,
        )
    return data


def render(tokenizer: Any, example: Any, system: str | None = None) -> tuple[str, str]:
    """``(prompt, response)`` texts of one example: the prompt ends where generation starts.
    ``system`` (``--system-prompt``) is a system message put first (through the chat template;
    without one, a paragraph before the instruction), unless the example has its own."""
    from fedlora.data import to_chat_messages

    messages = to_chat_messages(example, system=system, include_response=False)
    if getattr(tokenizer, "chat_template", None):
        try:
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": example["output"]}], tokenize=False
            )
        except Exception as err:  # jinja errors of a template that rejects these roles
            raise ConfigError(
                f"--model: its chat template cannot render the data ({str(err)[:200]})"
            ) from None
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise ConfigError(
                "--model: its chat template renders the prompt differently inside the whole "
                "conversation, so the response tokens cannot be found"
            )
        return prompt, full[len(prompt) :]
    user = messages[-1]["content"]
    bos = getattr(tokenizer, "bos_token", None) or ""
    sys_text = messages[0]["content"] if messages[0]["role"] == "system" else ""
    prompt = PLAIN_PROMPT.format(bos=bos, system=f"{sys_text}\n\n" if sys_text else "", user=user)
    return prompt, example["output"] + (tokenizer.eos_token or "")


def _question(example: Any) -> str:
    """The last user turn of an example (what samples.jsonl shows as the prompt)."""
    from fedlora.data import to_chat_messages

    return to_chat_messages(example, include_response=False)[-1]["content"]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def encode_examples(
    tokenizer: Any,
    examples: list[Any],
    category_of: list[int],
    max_length: int,
    *,
    system: str | None = None,
) -> tuple[LMBatch, list[list[int]], list[int], dict[str, int]]:
    """Tokenize examples for training: ``(batch, prompt ids, kept example indices, counts)``
    with ``counts`` = ``{"examples", "truncated", "dropped"}`` (see the module docstring);
    ``system``: the system prompt (`render`)."""
    pad = _pad_id(tokenizer)
    rows, prompts, kept = [], [], []
    truncated = dropped = 0
    for i, ex in enumerate(examples):
        prompt, response = render(tokenizer, ex, system)
        p, r = _ids(tokenizer, prompt), _ids(tokenizer, response)
        if not r:
            raise ConfigError(f"--data: example {i}'s response encodes to no tokens")
        if len(p) >= max_length:
            dropped += 1
            continue
        if len(p) + len(r) > max_length:
            truncated += 1
            r = r[: max_length - len(p)]
        rows.append((p, r))
        prompts.append(p)
        kept.append(i)
    n = len(rows)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE, dtype=torch.long)
    for j, (p, r) in enumerate(rows):
        seq = p + r
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
        labels[j, len(p) : len(seq)] = torch.tensor(r)
    cats = torch.tensor([category_of[i] for i in kept], dtype=torch.long)
    counts = {"examples": len(examples), "truncated": truncated, "dropped": dropped}
    return LMBatch(ids, mask, labels, cats), prompts, kept, counts


# ------------------------------------------------------------------------------------- model
def build_model(
    cfg: SimConfig, num_slots: int, rule: Any, preloaded: Any = None
) -> tuple[nn.Module, Any]:
    """The causal LM, frozen, in the configured dtype, with adapters (``num_slots`` slots) on
    ``--target-modules`` (default: `fedlora.models.default_llm_target_modules`), on the device."""
    from fedlora.injection import inject
    from fedlora.models import default_llm_target_modules, load_causal_lm
    from fedlora.simulate.devices import adapters_to_float32, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if preloaded is None:
        try:
            preloaded = load_causal_lm(cfg.model or "smollm2", dtype=dtype)
        except (ImportError, OSError, ValueError) as err:
            raise ConfigError(f"--model: {err}") from None
    lm, tokenizer = preloaded
    limit = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions")
    if isinstance(limit, int) and cfg.max_generate > 0 and cfg.max_new_tokens >= limit:
        raise ConfigError(
            f"--max-new-tokens {cfg.max_new_tokens} exceeds the model's {limit} positions (a "
            "prompt of at least one token and its answer must fit in them)"
        )
    if lm.get_output_embeddings() is None:
        raise ConfigError(f"--model: {type(lm).__name__} has no LM head")
    for p in lm.parameters():
        p.requires_grad_(False)
    try:
        targets = cfg.target_modules or default_llm_target_modules(lm)
        inject(
            lm,
            cfg.method,
            target_modules=targets,
            seed=cfg.seed,
            num_clients=num_slots,
            **rule.layer_options(),
        )
    except ValueError as err:
        raise ConfigError(f"--target-modules: {err}") from None
    lm.eval()
    if next(lm.parameters()).dtype != dtype:
        lm.to(dtype)
    adapters_to_float32(lm)
    lm.to(device)
    rule.setup(lm)
    return lm, tokenizer


def _decoder(lm: nn.Module) -> nn.Module | None:
    """The decoder stack whose last hidden state the LM head reads, when the logits are
    ``lm_head(that state)`` with nothing after it (LLaMA, Qwen2, Mistral, GPT-2, ...), so the head
    can be applied to selected positions only; None otherwise (soft-capped or scaled logits, or
    no separable decoder)."""
    config = getattr(lm, "config", None)
    if any(
        getattr(config, a, None) is not None for a in ("final_logit_softcapping", "logit_scale")
    ):
        return None
    try:
        decoder = lm.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not lm else None


def response_token_losses(lm: nn.Module, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, row)``: the cross-entropy of every response token (float32) and the row it is in.
    Position ``t`` predicts token ``t + 1``; the head runs only where the next token is one."""
    target = batch.labels[:, 1:]
    sel = target != IGNORE
    rows = sel.nonzero()[:, 0]
    decoder = _decoder(lm)
    if decoder is not None:
        out = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = lm.get_output_embeddings()(hidden[:, :-1][sel])
    else:  # a head with a transformation after it: all positions, then select
        out = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits[:, :-1][sel]
    nll = F.cross_entropy(logits.float(), target[sel], reduction="none")
    return nll, rows


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(lm: nn.Module, batch: LMBatch) -> tuple[float, float]:
    """``(perplexity, mean NLL)`` over every response token of ``batch`` (slot 0)."""
    device = model_device(lm)
    total, count = 0.0, 0
    for start in range(0, len(batch), EVAL_BATCH):
        part = batch.take(list(range(start, min(start + EVAL_BATCH, len(batch)))))
        nll, _ = response_token_losses(lm, part.trimmed().to(device))
        total += float(nll.double().sum())
        count += int(nll.numel())
    mean = total / max(count, 1)
    return math.exp(min(mean, 700.0)), mean


def eos_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the EOS token and a chat template's end-of-turn token."""
    ids = []
    for tok in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|end|>"):
        if not tok:
            continue
        i = tokenizer.convert_tokens_to_ids(tok)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(i, int) and i >= 0 and i != unk and i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def greedy_answers(
    lm: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy answers (decoded, special tokens skipped, stripped) to token-id prompts, batched
    with left padding."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = model_device(lm)
    pad, stops = _pad_id(tokenizer), eos_ids(tokenizer)
    gen = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    answers: list[str] = []
    for start in range(0, len(prompts), EVAL_BATCH):
        chunk = prompts[start : start + EVAL_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        out = lm.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
        )
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


class SFTTask:
    """Causal-LM instruction tuning (see the module docstring)."""

    name = "sft"
    columns = ("test_perplexity", "test_loss", "rouge_l", "exact_match")
    primary = "rouge_l"
    panels = (
        (("rouge_l", "ROUGE-L"), ("exact_match", "exact match")),
        (("test_perplexity", "test perplexity"),),
    )

    def load_data(self, cfg: SimConfig) -> Any:
        return load_data(cfg)

    def build_model(
        self, cfg: SimConfig, dataset: Any, num_slots: int, rule: Any, preloaded: Any = None
    ) -> tuple[nn.Module, Any]:
        return build_model(cfg, num_slots, rule, preloaded)

    def encode(self, tokenizer: Any, split: Any, cfg: SimConfig, *, test: bool = False):
        examples, cats = list(split.examples), list(split.labels)
        if test:
            keep = cfg.max_test or len(examples)
            examples, cats = examples[:keep], cats[:keep]
        system = cfg.system_prompt
        batch, prompts, kept, counts = encode_examples(
            tokenizer, examples, cats, cfg.max_length, system=system
        )
        if not len(batch):
            raise ConfigError(
                f"--max-length {cfg.max_length}: every {'test' if test else 'training'} prompt "
                "is at least that long, so no response token is left to "
                f"{'score' if test else 'train on'}"
            )
        batch.stats = counts
        if not test:
            return batch
        return SFTEval(
            batch=batch,
            prompts=prompts,
            references=[examples[i]["output"] for i in kept],
            questions=[_question(examples[i]) for i in kept],
            tokenizer=tokenizer,
            prompt_texts=[render(tokenizer, examples[i], system)[0] for i in kept[:NUM_SAMPLES]],
            examples=[examples[i] for i in kept],
            scorer=getattr(split, "scorer", None),
        )

    def cat(self, batches: list[LMBatch]) -> LMBatch:
        return LMBatch.cat(batches).trimmed()

    def segment_losses(
        self, model: nn.Module, batch: LMBatch, offsets: list[int]
    ) -> list[torch.Tensor]:
        nll, rows = response_token_losses(model, batch)
        bounds = torch.tensor(offsets[1:], device=rows.device)
        seg = torch.bucketize(rows, bounds, right=True)
        n = len(offsets) - 1
        sums = torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add(0, seg, nll)
        counts = torch.bincount(seg, minlength=n).clamp_min(1).to(nll.dtype)
        means = sums / counts
        return [means[t] for t in range(n)]

    def evaluate(self, model: nn.Module, test: SFTEval, cfg: SimConfig) -> dict[str, Any]:
        from fedlora.local import route_segments as set_segments
        from fedlora.simulate.tasks.scoring import score_answers

        set_segments(model, None, None)
        ppl, nll = perplexity(model, test.batch)
        n = min(cfg.max_generate, len(test.prompts))
        answers = greedy_answers(model, test.tokenizer, test.prompts[:n], cfg.max_new_tokens)
        scores = score_answers(
            answers,
            test.references[:n],
            scorer=test.scorer,
            examples=test.examples[:n] if test.scorer is not None else None,
        )
        prompt_texts = test.prompt_texts or test.questions
        samples = [
            {"prompt": p, "question": q, "answer": a, "reference": r}
            for p, q, a, r in zip(
                prompt_texts[:NUM_SAMPLES],
                test.questions,
                answers[:NUM_SAMPLES],
                test.references,
                strict=False,
            )
        ]
        return {"test_perplexity": ppl, "test_loss": nll, **scores, "samples": samples}

    def round_line(self, row: dict[str, Any]) -> str:
        return (
            f"ppl {row['test_perplexity']:.2f}  rouge-L {row['rouge_l']:.3f}  "
            f"EM {row['exact_match']:.3f}"
        )

    def primary_available(self, cfg: SimConfig) -> bool:
        """ROUGE-L needs generated answers: none with ``--max-generate 0``."""
        return cfg.max_generate > 0

    def data_note(self, train: Any, test: Any) -> str | None:
        """One line on truncated / left-out examples (None when there are none)."""
        parts = []
        for what, stats in (("train", train.stats), ("test", test.stats)):
            if stats.get("truncated") or stats.get("dropped"):
                parts.append(
                    f"{what}: {stats['truncated']} of {stats['examples']} responses truncated, "
                    f"{stats['dropped']} prompts longer than --max-length left out"
                )
        return "; ".join(parts) or None
