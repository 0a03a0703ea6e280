"""Decoder-only LMs (Llama, Qwen2/3, SmolLM, Mistral, GPT-2, ...): one ``decoder`` stack.

Examples are prompt -> completion (:mod:`layergeo.completions`). The CE is completion-only, as
the authors' LLM code: a position counts when the token it predicts is a completion token (the
answer and its eos). By default the KL and the hidden matching count the same positions
(``loss.positions=completion``): the prompt is given text, the same for every strategy, and the
task is the completion. ``loss.positions=all`` counts every non-padding position instead, which
is what the authors' hidden and KL terms did (they masked neither prompt nor padding; layergeo
still leaves padding out). ``hidden_states[k]`` is the output of layer k; in Llama-style models
the last one has the final norm applied (paper notes section 2.1).

Students copy the embeddings, the final norm and the LM head and the chosen layers
(``student.copy_rule=first_last`` is the authors' "keep first and last" rule), and with
``student.lora.r`` set train only a LoRA adapter (peft) on the frozen copy, as the authors'
Qwen3 students; a checkpoint holds the adapter and the merged model (:mod:`layergeo.adapters`).
The teacher may be fine-tuned the same way (``teacher.lora.r``); it is merged when saved.

Evaluation: the task accuracy, by ranking the task's choices by the log-likelihood of their
tokens after the prompt (lm-evaluation-harness' ``acc``) when the task has choices, else by exact
match of the greedy completion; also the exact match, the completion token accuracy and the
perplexity of the reference completions.

The embedded default ``smollm2`` is SmolLM2-135M-Instruct (30 layers, width 576), Q4_1 weights
dequantised to float32 (:mod:`layergeo.smollm2`). ``tiny-llama``, ``tiny-qwen3`` and
``tiny-gpt2`` are random 4-layer, 64-wide models on the MiniLM vocabulary, for tests.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from layergeo import completions, smollm2
from layergeo.adapters import add_lora
from layergeo.completions import IGNORE
from layergeo.config import data_seed
from layergeo.errors import LayergeoError
from layergeo.families.base import Family, register_family, unwrap
from layergeo.losses import kl_to_teacher
from layergeo.models import (
    copy_chosen_layers, embedded_teacher_path, find_stack, read_model_config, student_heads,
)

EMBEDDED = "smollm2"
TINY = {  # name -> model type and its config keywords
    "tiny-llama": ("llama", {"num_key_value_heads": 2, "intermediate_size": 128}),
    "tiny-qwen3": ("qwen3", {"num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16}),
    "tiny-gpt2": ("gpt2", {"n_inner": 128}),
}
EXAMPLES_KEPT = 3  # generated completions written into the metrics
RANK_ROWS = 16  # prompt+choice rows per forward pass when choices take several tokens


def _tiny_config(name: str, tokenizer):
    model_type, extra = TINY[name]
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def _minilm_tokenizer():
    """The MiniLM WordPiece tokenizer as a causal one: [CLS] starts a prompt, [SEP] ends a completion."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_path())
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    return tokenizer


def _ready(model, tokenizer):
    """Pad on the right for training; a pad token (the eos when the model has none); the same ids for generation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


@register_family("causal")
class CausalFamily(Family):
    stacks = ("decoder",)
    metric = "accuracy"
    caches_teacher = False  # the teacher runs live: a 49k-152k vocabulary per token is too big to store
    adapters = True

    def load_task(self, config):
        cap = config.data.max_eval
        return completions.load_completion_task(config.data.task, {"train": config.data.max_train, "dev": cap, "test": cap},
                                                data_seed(config))

    def encode(self, config, task, split, tokenizer, model_config):
        return completions.encode_completions(task.splits[split], task, tokenizer, config.data.max_length,
                                              config.loss.positions)

    def collator(self, tokenizer, model):
        return completions.CompletionCollator(tokenizer.pad_token_id)

    # ---- models

    def model_config(self, spec: str):
        if spec in TINY:
            return _tiny_config(spec, _minilm_tokenizer())
        if spec == EMBEDDED:
            return AutoConfig.from_pretrained(smollm2.model_folder())
        config = read_model_config(spec, EMBEDDED)
        if getattr(config, "is_encoder_decoder", False):
            raise LayergeoError(f"teacher model {spec!r} is an encoder-decoder; use teacher.family=seq2seq for it")
        return config

    def load_pretrained(self, spec: str, task):
        if spec in TINY:
            tokenizer = _minilm_tokenizer()
            return _ready(AutoModelForCausalLM.from_config(_tiny_config(spec, tokenizer)), tokenizer)
        path = str(smollm2.model_folder()) if spec == EMBEDDED else spec
        if spec != EMBEDDED:
            self.model_config(spec)  # a decoder-only model, reachable
        try:
            return _ready(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
        except (OSError, ValueError) as exc:
            raise LayergeoError(f"cannot load model {spec!r} ({str(exc).splitlines()[0][:160]}); offline, use the "
                                f"embedded default {EMBEDDED!r}") from None

    def prepare_teacher(self, model, config):
        return add_lora(model, config.teacher.lora) if config.teacher.lora.r else model

    def load_checkpoint(self, path: Path):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LayergeoError(f"{path} holds no model (config.json missing); is it a checkpoint directory?")
        try:
            return _ready(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, safetensors' own errors
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise LayergeoError(f"checkpoint {path} cannot be loaded ({reason}); re-run training to rewrite it") from None

    def depths(self, model_config):
        return {"decoder": int(model_config.num_hidden_layers)}  # GPT-2's n_layer through its attribute map

    def width(self, model_config) -> int:
        return int(model_config.hidden_size)

    def max_positions(self, model_config):
        limit = getattr(model_config, "max_position_embeddings", None)
        return None if limit is None else int(limit)

    def check_student(self, teacher_config, spec):
        if spec.lora.r and spec.init != "copy":
            raise LayergeoError("student.lora trains an adapter on a frozen base, and a random base would stay random; "
                                "use student.init=copy, or student.lora.r=null to train every parameter")
        if spec.lora.r and spec.hidden_size not in (None, self.width(teacher_config)):
            raise LayergeoError("a LoRA student is a copy of the teacher at its width; leave student.hidden_size null")

    def build_student(self, teacher, spec, copy_from):
        self.check_student(teacher.config, spec)
        chosen = copy_from["decoder"] if spec.init == "copy" else None
        model = AutoModelForCausalLM.from_config(_student_config(teacher.config, spec, chosen))
        model.generation_config = copy.deepcopy(teacher.generation_config)
        if chosen is not None:
            teacher_stack = find_stack(teacher, self.depths(teacher.config)["decoder"], "the decoder")
            student_stack = find_stack(model, spec.layers, "the decoder")
            in_stack = {id(t) for t in [*teacher_stack.parameters(), *teacher_stack.buffers()]}
            rest = {k: v.detach() for k, v in teacher.state_dict(keep_vars=True).items() if id(v) not in in_stack}
            unexpected = model.load_state_dict(rest, strict=False).unexpected_keys
            if unexpected:
                raise LayergeoError(f"the student has no place for teacher weights {unexpected[:3]}; is it the same model type?")
            copy_chosen_layers(teacher_stack, student_stack, chosen)
        return add_lora(model, spec.lora) if spec.lora.r else model

    # ---- one forward pass

    def inputs(self, batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def hidden_states(self, output):
        return {"decoder": output.hidden_states}

    def masks(self, batch):
        return {"decoder": batch["distil_mask"]}

    def prediction_mask(self, batch):
        return batch["distil_mask"].bool()

    def task_loss(self, logits, batch):
        """(B, T, V) logits; the mean CE over the positions that predict a completion token."""
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)

    def kl_loss(self, student_logits, teacher_logits, batch, temperature):
        """T^2 KL of the next-token distributions, averaged over the positions of ``distil_mask``."""
        keep = batch["distil_mask"].bool()
        return kl_to_teacher(student_logits[keep], teacher_logits[keep], temperature)

    @torch.inference_mode()
    def evaluate(self, model, loader, device, config, tokenizer, accelerator=None):
        from accelerate.utils import gather_object

        lm = unwrap(model)
        was_training = lm.training
        lm.eval()
        dataset = loader.dataset
        max_new = config.generation.max_new_tokens or dataset.longest_completion
        scores, answers, sums = {}, {}, torch.zeros(3, dtype=torch.float64)  # CE sum, tokens right, tokens
        for batch in loader:
            indices = batch["index"].tolist()
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = lm(**self.inputs(batch)).logits
            target = batch["labels"][:, 1:]
            keep = target != IGNORE
            predicted = logits[:, :-1][keep].float()
            sums += torch.tensor([float(F.cross_entropy(predicted, target[keep], reduction="sum")),
                                  float((predicted.argmax(-1) == target[keep]).sum()), float(keep.sum())], dtype=torch.float64)
            if dataset.choice_ids is not None:
                scores.update(zip(indices, choice_scores(lm, logits, dataset, indices, device)))
            answers.update(zip(indices, greedy_completions(lm, dataset, indices, tokenizer, max_new, device)))
        if accelerator is not None and accelerator.num_processes > 1:
            shares = gather_object([(scores, answers, sums)])
            scores = {i: s for share in shares for i, s in share[0].items()}
            answers = {i: a for share in shares for i, a in share[1].items()}
            sums = sum((share[2] for share in shares), torch.zeros(3, dtype=torch.float64))
        lm.train(was_training)
        order = sorted(answers)
        exact = [completions.normalise_answer(answers[i]) == dataset.completions[i] for i in order]
        token_ce = float(sums[0] / max(float(sums[2]), 1.0))
        metrics = {"exact_match": sum(exact) / len(order), "token_accuracy": float(sums[1] / max(float(sums[2]), 1.0)),
                   "token_ce": token_ce, "perplexity": float(torch.tensor(token_ce).exp()), "n": len(order)}
        if dataset.choice_ids is not None:
            chosen = [int(torch.tensor(scores[i]).argmax()) for i in order]
            gold = [dataset.gold[i] for i in order]
            metrics["choice_accuracy"] = sum(c == g for c, g in zip(chosen, gold)) / len(order)
            metrics["majority_rate"] = max(Counter(gold).values()) / len(order)  # always answering the commonest choice
            metrics["predicted_classes"] = len(set(chosen))  # 1: the student gives one answer to everything
        metrics["accuracy"] = metrics.get("choice_accuracy", metrics["exact_match"])
        metrics["accuracy_by"] = "choice log-likelihood" if dataset.choice_ids is not None else "greedy exact match"
        metrics["examples"] = [{"reference": dataset.completions[i], "generated": answers[i].strip()} for i in order[:EXAMPLES_KEPT]]
        return metrics

    def describe_metrics(self, metrics):
        return (f"accuracy {100 * metrics['accuracy']:.1f}% ({metrics['accuracy_by']}), exact match "
                f"{100 * metrics['exact_match']:.1f}%, perplexity {metrics['perplexity']:.2f}")


def _student_config(teacher_config, spec, chosen: list[int] | None):
    """The teacher's config with ``spec.layers`` layers (per-layer settings of the chosen layers) and its width."""
    config = copy.deepcopy(teacher_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = spec.layers
    layer_types = getattr(config, "layer_types", None)  # Qwen3, Gemma: one attention kind per layer
    if isinstance(layer_types, list):
        config.layer_types = [layer_types[k - 1] for k in chosen] if chosen else layer_types[:spec.layers]
    if spec.hidden_size is None:
        return config
    hidden = spec.hidden_size
    heads = student_heads(spec, int(config.num_attention_heads))
    ratio_key = next((k for k in ("intermediate_size", "n_inner") if getattr(config, k, None)), None)
    if ratio_key:
        setattr(config, ratio_key, spec.intermediate_size or int(round(getattr(config, ratio_key) / config.hidden_size * hidden)))
    if getattr(config, "num_key_value_heads", None):
        kv = min(int(config.num_key_value_heads), heads)
        while heads % kv:
            kv -= 1
        config.num_key_value_heads = kv
    if getattr(config, "head_dim", None):
        config.head_dim = hidden // heads
    config.hidden_size, config.num_attention_heads = hidden, heads
    return config


def choice_scores(lm, logits: torch.Tensor, dataset, indices: list[int], device) -> list[list[float]]:
    """Per example, the log-likelihood of each choice's tokens after its prompt.

    ``logits``: (B, T, V) of the batch of ``indices`` (prompt + reference completion, right-padded).
    When every choice is one token, its score is read at the prompt's last position of that pass;
    otherwise each prompt + choice is scored in passes of :data:`RANK_ROWS` rows.
    """
    if all(len(c) == 1 for c in dataset.choice_ids):
        tokens = torch.tensor([c[0] for c in dataset.choice_ids], device=logits.device)
        last = torch.tensor([len(dataset.prompts[i]) - 1 for i in indices], device=logits.device)
        log_p = F.log_softmax(logits[torch.arange(len(indices), device=logits.device), last].float(), dim=-1)
        return log_p[:, tokens].tolist()
    return _scored_rows(lm, dataset, indices, device)


def _scored_rows(lm, dataset, indices, device):
    rows = [(dataset.prompts[i], choice) for i in indices for choice in dataset.choice_ids]
    flat = []
    for start in range(0, len(rows), RANK_ROWS):
        chunk = rows[start:start + RANK_ROWS]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (p, c) in enumerate(chunk):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            mask[r, :len(p) + len(c)] = 1
        log_p = F.log_softmax(lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
        for r, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=log_p.device)
            flat.append(float(log_p[r, positions, torch.tensor(c, device=log_p.device)].sum()))
    n = len(dataset.choice_ids)
    return [flat[k * n:(k + 1) * n] for k in range(len(indices))]


def greedy_completions(lm, dataset, indices: list[int], tokenizer, max_new: int, device) -> list[str]:
    """The greedy continuation of each prompt (left-padded into one batch), as text without special tokens."""
    prompts = [dataset.prompts[i] for i in indices]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generated = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
