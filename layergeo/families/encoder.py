"""Encoder classifiers (BERT, RoBERTa, MiniLM, ... on GLUE-like tasks): one ``encoder`` stack.

Hidden states are ``output_hidden_states`` of the encoder; every non-padding token counts
([CLS] and [SEP] included); the prediction loss is CE on the label and the KL of the class
distributions; metrics are accuracy (and macro-F1 for more than two classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from transformers import DataCollatorWithPadding

from layergeo import data
from layergeo.config import data_seed
from layergeo.errors import LayergeoError
from layergeo.families.base import Family, register_family, unwrap
from layergeo.losses import kl_to_teacher
from layergeo.models import (
    EMBEDDED_TEACHER, build_encoder_student, depth, embedded_teacher_path, load_checkpoint, load_pretrained, read_model_config,
    student_config, tiny_bert_config, width,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@register_family("encoder")
class EncoderFamily(Family):
    stacks = ("encoder",)
    metric = "accuracy"
    caches_teacher = True
    reads_plain_texts = True

    def load_task(self, config):
        cap = config.data.max_eval
        return data.load_task(config.data.task, max_examples={"train": config.data.max_train, "dev": cap, "test": cap},
                              seed=data_seed(config))

    def task_check(self, task, model_config, where: Path) -> None:
        labels = getattr(model_config, "num_labels", None)
        if labels is not None and labels != task.num_labels:
            raise LayergeoError(f"the teacher in {where} predicts {labels} labels but {task.name} has "
                                f"{task.num_labels}; fine-tune a teacher on this task")

    def encode(self, config, task, split, tokenizer, model_config):
        return data.encode(task.splits[split], tokenizer, task.text_columns, config.data.max_length)

    def collator(self, tokenizer, model):
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def model_config(self, spec: str):
        if spec == "tiny-bert":
            return tiny_bert_config(2, 2)
        return read_model_config(embedded_teacher_path() if spec == EMBEDDED_TEACHER else spec, EMBEDDED_TEACHER)

    def load_pretrained(self, spec: str, task):
        model, tokenizer = load_pretrained(spec, task.num_labels)
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
        return model, tokenizer

    def load_checkpoint(self, path: Path):
        return load_checkpoint(path)

    def depths(self, model_config):
        return {"encoder": depth(model_config)}

    def width(self, model_config) -> int:
        return width(model_config)

    def max_positions(self, model_config):
        limit = getattr(model_config, "max_position_embeddings", None)
        return None if limit is None else int(limit)

    def check_student(self, teacher_config, spec):
        if spec.hidden_size is not None:
            student_config(teacher_config, spec)  # heads must divide the width

    def build_student(self, teacher, spec, copy):
        model = build_encoder_student(teacher, spec, copy["encoder"])
        model.config.id2label, model.config.label2id = teacher.config.id2label, teacher.config.label2id
        return model

    def inputs(self, batch):
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    def hidden_states(self, output):
        return {"encoder": output.hidden_states}

    def masks(self, batch):
        return {"encoder": batch["attention_mask"]}

    def task_loss(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"])

    def kl_loss(self, student_logits, teacher_logits, batch, temperature):
        return kl_to_teacher(student_logits, teacher_logits, temperature)

    @torch.inference_mode()
    def evaluate(self, model, loader, device, config, tokenizer, accelerator=None):
        """Accuracy (and macro-F1 when there are more than two classes), with the accuracy of always
        answering the most common label and the number of distinct predicted labels (1 means the model
        collapsed to a single class).

        With an ``accelerator`` of several processes, ``loader`` is a prepared (sharded) loader and
        the predictions of all processes are gathered: every process returns the full-split metrics.
        """
        num_labels = int(unwrap(model).config.num_labels)
        was_training = model.training
        model.eval()
        gather = accelerator is not None and accelerator.num_processes > 1
        predictions, labels = [], []
        for batch in loader:
            logits = model(**{k: v.to(device) for k, v in self.inputs(batch).items()}).logits
            predicted, label = logits.argmax(-1), batch["labels"]
            if gather:
                predicted, label = accelerator.gather_for_metrics((predicted, label.to(device)))
            predictions.append(predicted.cpu())
            labels.append(label.cpu())
        model.train(was_training)
        y_pred, y_true = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        metrics = {"accuracy": float((y_pred == y_true).mean()), "n": int(len(y_true)),
                   "majority_rate": float(np.bincount(y_true).max() / len(y_true)),
                   "predicted_classes": int(len(np.unique(y_pred)))}
        if num_labels > 2:
            metrics["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels))))
        return metrics
