"""Encoder-decoders (T5, BART, Marian, ``EncoderDecoderModel``): ``encoder`` and ``decoder`` stacks.

Decoder states are teacher-forced on the reference target (``decoder_input_ids`` = the labels
shifted right, as the model itself builds them). The positions that count are the non-padding
source tokens (encoder) and the non-padding target tokens (decoder, where ``labels != -100``).
The loss is the authors' seq2seq loss: token-level CE with padding ignored and T^2 KL(p_T || p_S)
averaged over the non-padding target positions; evaluation generates (greedy or beam) and scores
BLEU and chrF with sacrebleu against the references as the tokenizer writes them (an uncased
tokenizer's references are lowercased, so hypothesis and reference are compared alike).

Each config names its depths and width its own way: ``EncoderDecoderConfig`` (``encoder`` /
``decoder`` sub-configs, ``num_hidden_layers``, ``hidden_size``), T5 (``num_layers``,
``num_decoder_layers``, ``d_model``), BART / Marian / mBART / Pegasus (``encoder_layers``,
``decoder_layers``, ``d_model``).

The embedded default ``minilm`` is a warm-started bert2bert: encoder and decoder both start from
all-MiniLM-L6-v2 (6 + 6 layers, width 384); only the cross-attention and the LM-head transform
start random. ``tiny-bert2bert`` is a random 4 + 4-layer, 64-wide one for tests.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, EncoderDecoderConfig, EncoderDecoderModel,
)
from transformers.utils import logging as hf_logging

from layergeo import pairs
from layergeo.config import data_seed
from layergeo.errors import LayergeoError
from layergeo.families.base import Family, register_family, unwrap
from layergeo.losses import kl_to_teacher
from layergeo.models import (
    EMBEDDED_TEACHER, copy_chosen_layers, embedded_teacher_path, find_stack, read_model_config, tiny_bert_config,
)

IGNORE = -100  # label of a padding position
TINY = "tiny-bert2bert"
EXAMPLES_KEPT = 3  # generated examples written into the metrics


def _depth_keys(config) -> dict[str, tuple[object, str]]:
    """Stack -> (the config object holding its depth, the attribute name)."""
    if config.model_type == "encoder-decoder":
        return {"encoder": (config.encoder, "num_hidden_layers"), "decoder": (config.decoder, "num_hidden_layers")}
    if hasattr(config, "num_decoder_layers"):  # T5, mT5, UMT5
        return {"encoder": (config, "num_layers"), "decoder": (config, "num_decoder_layers")}
    if hasattr(config, "encoder_layers") and hasattr(config, "decoder_layers"):  # BART, Marian, mBART, Pegasus
        return {"encoder": (config, "encoder_layers"), "decoder": (config, "decoder_layers")}
    raise LayergeoError(f"a {config.model_type} config names no encoder and decoder depth; the seq2seq family takes "
                        "T5, BART, Marian, mBART, Pegasus or an EncoderDecoderModel")


def _set_special_tokens(model_or_config, tokenizer) -> None:
    """bert2bert: start decoding with [CLS], stop at [SEP], pad with [PAD] (model and generation config)."""
    configs = [model_or_config.config, model_or_config.generation_config] if hasattr(model_or_config, "config") else [model_or_config]
    for config in configs:
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id


class _QuietLoading:
    """Silence transformers' report of the randomly initialised cross-attention of a warm start."""

    def __enter__(self):
        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)

    def __exit__(self, *exc):
        hf_logging.set_verbosity(self.level)


@register_family("seq2seq")
class Seq2SeqFamily(Family):
    stacks = ("encoder", "decoder")
    metric = "bleu"
    caches_teacher = False  # the teacher runs live: full-vocabulary logits per target token are too big to store
    length_keys = ("max_length", "max_target_length")

    def load_task(self, config):
        cap = config.data.max_eval
        return pairs.load_pair_task(config.data.task, {"train": config.data.max_train, "dev": cap, "test": cap}, data_seed(config))

    def encode(self, config, task, split, tokenizer, model_config):
        start = model_config.decoder_start_token_id if model_config.model_type == "encoder-decoder" else None
        return pairs.encode_pairs(task.splits[split], tokenizer, config.data.max_length, config.data.max_target_length,
                                  drop_start=start)

    def collator(self, tokenizer, model):
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE, return_tensors="pt")

    # ---- models

    def model_config(self, spec: str):
        if spec == TINY:
            return self._bert2bert_config(tiny_bert_config(30522, 2), self._embedded_tokenizer())
        if spec == EMBEDDED_TEACHER:
            path = embedded_teacher_path()
            return self._bert2bert_config(AutoConfig.from_pretrained(path), self._embedded_tokenizer())
        config = read_model_config(spec, EMBEDDED_TEACHER)
        if not getattr(config, "is_encoder_decoder", False):
            raise LayergeoError(f"teacher model {spec!r} is a {config.model_type}, not an encoder-decoder; the seq2seq "
                                "family takes T5, BART, Marian or an EncoderDecoderModel (teacher.family=encoder for encoders)")
        _depth_keys(config)
        return config

    @staticmethod
    def _embedded_tokenizer():
        return AutoTokenizer.from_pretrained(embedded_teacher_path())

    @staticmethod
    def _bert2bert_config(bert, tokenizer):
        config = EncoderDecoderConfig.from_encoder_decoder_configs(bert, copy.deepcopy(bert))
        _set_special_tokens(config, tokenizer)
        return config

    def load_pretrained(self, spec: str, task):
        if spec in (TINY, EMBEDDED_TEACHER):
            tokenizer = self._embedded_tokenizer()
            if spec == TINY:
                model = EncoderDecoderModel(config=self.model_config(TINY))
            else:
                path = embedded_teacher_path()
                with _QuietLoading():
                    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
            _set_special_tokens(model, tokenizer)
            return model, tokenizer
        self.model_config(spec)  # an encoder-decoder, reachable
        try:
            return AutoModelForSeq2SeqLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
        except OSError as exc:
            raise LayergeoError(f"cannot load model {spec!r} ({str(exc).splitlines()[0][:160]}); offline, use the "
                                "embedded default 'minilm'") from None

    def load_checkpoint(self, path: Path):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LayergeoError(f"{path} holds no model (config.json missing); is it a checkpoint directory?")
        try:
            with _QuietLoading():
                return AutoModelForSeq2SeqLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, safetensors' own errors
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise LayergeoError(f"checkpoint {path} cannot be loaded ({reason}); re-run training to rewrite it") from None

    def depths(self, model_config):
        return {stack: int(getattr(holder, key)) for stack, (holder, key) in _depth_keys(model_config).items()}

    def width(self, model_config) -> int:
        if model_config.model_type == "encoder-decoder":
            return int(model_config.encoder.hidden_size)
        return int(model_config.d_model)

    def max_positions(self, model_config):
        holder = model_config.encoder if model_config.model_type == "encoder-decoder" else model_config
        limit = getattr(holder, "max_position_embeddings", None)  # T5 has relative positions: no limit
        return None if limit is None else int(limit)

    def student_depths(self, spec):
        return {"encoder": spec.layers, "decoder": spec.decoder_layers or spec.layers}

    def check_student(self, teacher_config, spec):
        if spec.hidden_size is not None and spec.hidden_size != self.width(teacher_config):
            raise LayergeoError("a narrower seq2seq student is not supported yet; leave student.hidden_size null "
                                "(the teacher's width)")

    def build_student(self, teacher, spec, copy_from):
        self.check_student(teacher.config, spec)
        config = copy.deepcopy(teacher.config)
        depths = self.student_depths(spec)
        for stack, (holder, key) in _depth_keys(config).items():
            setattr(holder, key, depths[stack])
        model = AutoModelForSeq2SeqLM.from_config(config)
        model.generation_config = copy.deepcopy(teacher.generation_config)
        if spec.init == "copy":
            teacher_stacks = self._layer_stacks(teacher, self.depths(teacher.config))
            student_stacks = self._layer_stacks(model, depths)
            in_stacks = {id(t) for stack in teacher_stacks.values() for t in [*stack.parameters(), *stack.buffers()]}
            rest = {k: v.detach() for k, v in teacher.state_dict(keep_vars=True).items() if id(v) not in in_stacks}
            unexpected = model.load_state_dict(rest, strict=False).unexpected_keys
            if unexpected:
                raise LayergeoError(f"the student has no place for teacher weights {unexpected[:3]}; is it the same model type?")
            for stack in self.stacks:
                copy_chosen_layers(teacher_stacks[stack], student_stacks[stack], copy_from[stack])
        return model

    def _layer_stacks(self, model, depths: dict[str, int]):
        return {"encoder": find_stack(model.get_encoder(), depths["encoder"], "the encoder"),
                "decoder": find_stack(model.get_decoder(), depths["decoder"], "the decoder")}

    # ---- one forward pass

    def inputs(self, batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}

    def hidden_states(self, output):
        return {"encoder": output.encoder_hidden_states, "decoder": output.decoder_hidden_states}

    def masks(self, batch):
        return {"encoder": batch["attention_mask"], "decoder": batch["labels"] != IGNORE}

    def prediction_mask(self, batch):
        return batch["labels"] != IGNORE

    def task_loss(self, logits, batch):
        """(B, T, V) logits; the mean over the non-padding target tokens."""
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def kl_loss(self, student_logits, teacher_logits, batch, temperature):
        """T^2 KL per non-padding target position, averaged over those positions."""
        keep = batch["labels"] != IGNORE
        return kl_to_teacher(student_logits[keep], teacher_logits[keep], temperature)

    @torch.inference_mode()
    def evaluate(self, model, loader, device, config, tokenizer, accelerator=None):
        """Corpus BLEU and chrF (sacrebleu, 0-100) of generated targets; also the token-level dev CE,
        the length ratio, how many outputs are empty, and a few examples."""
        from accelerate.utils import gather_object

        generator = unwrap(model)
        was_training = generator.training
        generator.eval()
        max_new = config.generation.max_new_tokens or config.data.max_target_length
        outputs, ce_sum, tokens = {}, 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = generator(**self.inputs(batch)).logits
            n = int((batch["labels"] != IGNORE).sum())
            ce_sum, tokens = ce_sum + float(self.task_loss(logits, batch)) * n, tokens + n
            generated = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           num_beams=config.generation.num_beams, max_new_tokens=max_new, do_sample=False)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            outputs.update(zip(batch["index"].tolist(), (t.strip() for t in texts)))
        if accelerator is not None and accelerator.num_processes > 1:
            shares = gather_object([(outputs, ce_sum, tokens)])
            outputs = {i: t for share, _, _ in shares for i, t in share.items()}
            ce_sum, tokens = sum(s[1] for s in shares), sum(s[2] for s in shares)
        generator.train(was_training)
        order = sorted(outputs)
        references = [loader.dataset.references[i] for i in order]
        hypotheses = [outputs[i] for i in order]
        bleu = sacrebleu.corpus_bleu(hypotheses, [references])
        return {"bleu": float(bleu.score), "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
                "n": len(order), "token_ce": ce_sum / max(tokens, 1), "length_ratio": float(bleu.sys_len / max(bleu.ref_len, 1)),
                "empty_outputs": sum(1 for h in hypotheses if not h),
                "examples": [{"reference": r, "generated": h} for r, h in zip(references[:EXAMPLES_KEPT], hypotheses)]}

    def describe_metrics(self, metrics):
        return f"BLEU {metrics['bleu']:.2f}, chrF {metrics['chrf']:.1f}"
