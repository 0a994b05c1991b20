"""Task queries in a batch, their targets (matched to the queries in order) and the checks of the model's inputs.

Remote code: torch and transformers only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .box_ops import invalid_box_rows, invalid_span_rows
from .configuration_tpo import IGNORE_INDEX, ROUTER_CLASSES, TASK_NAMES


@dataclass
class TaskQueries:
    """Where one task's queries sit in a batch: `batch_index` (num_queries,) and `positions`
    (num_queries, num_task_tokens), the sequence positions of each query's slot tokens."""

    batch_index: torch.LongTensor
    positions: torch.LongTensor

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> task embeddings (num_queries, num_task_tokens, hidden)."""
        return hidden_states[self.batch_index[:, None], self.positions]


class TPOTargetsMixin:
    """Locating the task queries, matching targets to them and refusing bad inputs, for
    [`TPOForConditionalGeneration`] (reads `config`, `_tasks`, `_disabled_token_ids`, `_valid_task_labels`
    and `_id_tensor`)."""

    def _locate_task_queries(self, input_ids: torch.LongTensor) -> dict[str, TaskQueries]:
        """Find the slot tokens of each enabled task: {task: TaskQueries}.

        A query is a run of the task's `num_task_tokens` slot tokens, in order.
        """
        queries = {}
        token_ids = self.config.task_token_ids
        for task in self._tasks:
            slot_ids = token_ids[task]["slots"]
            batch_index, first = (input_ids == slot_ids[0]).nonzero(as_tuple=True)
            positions = first[:, None]  # (num_queries, num_task_tokens)
            if len(slot_ids) > 1:
                positions = positions + torch.arange(len(slot_ids), device=input_ids.device)
                seq_len = input_ids.shape[1]
                inside = (positions < seq_len).all(-1)
                expected = torch.tensor(slot_ids, device=input_ids.device)
                found = input_ids[batch_index[:, None], positions.clamp(max=seq_len - 1)]
                complete = inside & (found == expected).all(-1)
                counts = [(input_ids == i).sum().item() for i in slot_ids]
                if not bool(complete.all()) or len(set(counts)) > 1:
                    bad = sorted(set(batch_index[~complete].tolist())) or "(unequal slot counts)"
                    strings = self.config.task_token_strings[task]["slots"]
                    raise ValueError(
                        f"Sample(s) {bad}: the {task} slot tokens must appear as complete runs "
                        f"{''.join(strings)}; found counts {dict(zip(strings, counts))}."
                    )
            queries[task] = TaskQueries(batch_index=batch_index, positions=positions)
        return queries

    def _match_targets(
        self,
        task: str,
        queries: TaskQueries | None,
        targets: torch.Tensor,
        target_batch_index: torch.LongTensor | None,
    ) -> torch.Tensor:
        """Check that every sample has as many targets as slots and return the targets, in query order."""
        num_queries = 0 if queries is None else queries.batch_index.numel()
        if (target_batch_index is not None and num_queries and target_batch_index.shape[0] == num_queries
                and targets.shape[0] == num_queries):
            # The collator's case: targets already in (sample, position) order. One test (and one host sync)
            # checks the order and, for boxes, their values; anything else takes the path below, which
            # reorders or names the faulty sample.
            in_order = (target_batch_index.to(queries.batch_index.device) == queries.batch_index).all()
            if task == "region":
                in_order = in_order & ~invalid_box_rows(targets).any().to(in_order.device)
            if bool(in_order):
                return targets
        slot = self.config.task_token_strings[task]["slots"][0]
        if target_batch_index is not None:
            batch_size = int(max(queries.batch_index.max().item() + 1 if num_queries else 0,
                                 target_batch_index.max().item() + 1 if target_batch_index.numel() else 0))
            query_counts = torch.bincount(queries.batch_index, minlength=batch_size) if num_queries else None
            target_counts = torch.bincount(target_batch_index.to(targets.device).long(), minlength=batch_size)
            if query_counts is None:
                query_counts = torch.zeros_like(target_counts)
            query_counts = query_counts.to(target_counts.device)
            mismatched = (query_counts != target_counts).nonzero().flatten().tolist()
            if mismatched:
                i = mismatched[0]
                raise ValueError(
                    f"Sample {i} has {int(query_counts[i])} {task} slot(s) ({slot}) but {int(target_counts[i])} "
                    f"{task} target(s); each {slot} slot needs exactly one target (mismatched samples: {mismatched})."
                )
            if num_queries:
                order = torch.argsort(target_batch_index.to(targets.device), stable=True)
                targets = targets[order]
        elif num_queries != targets.shape[0]:
            raise ValueError(
                f"The batch has {num_queries} {task} slot(s) ({slot}) but {targets.shape[0]} {task} target(s); "
                f"pass `{task}_batch_index` to find the sample at fault."
            )
        if task == "region":
            self._check_boxes(targets, queries)
        return targets

    def _check_boxes(self, boxes: torch.Tensor, queries: TaskQueries | None) -> None:
        bad = invalid_box_rows(boxes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            sample = int(queries.batch_index[j]) if queries is not None and queries.batch_index.numel() > j else "?"
            raise ValueError(
                f"Region target {j} (sample {sample}) is {boxes[j].tolist()}: boxes must be normalised "
                "(x0, y0, x1, y1) within [0, 1] with x0 <= x1 and y0 <= y1. Normalise pixel boxes by the "
                "processed image size (TPOProcessor does) and check for swapped corners."
            )

    @staticmethod
    def _check_mask_inputs(sam2_pixel_values: torch.Tensor, mask_targets: torch.Tensor | None,
                           mask_query_index: torch.Tensor, batch_index: torch.Tensor) -> None:
        """Refuse non-finite SAM2 pixels and mask targets other than 0/1 (NaN included), naming the SAM2
        image and its sample; one test (one host sync) when everything is valid."""
        bad_pixels = ~torch.isfinite(sam2_pixel_values.flatten(1)).all(-1)  # (m,)
        bad_targets = torch.zeros_like(bad_pixels)
        if mask_targets is not None and mask_targets.shape[0] == bad_pixels.shape[0]:
            targets = mask_targets.flatten(1)
            bad_targets = ~((targets == 0) | (targets == 1)).all(-1).to(bad_pixels.device)
        if not bool((bad_pixels | bad_targets).any()):
            return
        image = int((bad_pixels | bad_targets).nonzero()[0])
        sample = int(batch_index[mask_query_index[image]])
        if bool(bad_pixels[image]):
            raise ValueError(f"SAM2 image {image} (sample {sample}) holds non-finite pixel values; check that image's "
                             "decoding and normalisation (TPOProcessor.sam2_inputs).")
        values = mask_targets[image].flatten()
        odd = values[~((values == 0) | (values == 1))][0].item()
        raise ValueError(f"The mask target of SAM2 image {image} (sample {sample}) holds the value {odd}; mask targets "
                         "are binary (0 or 1): resize masks with nearest-neighbour interpolation (TPOProcessor does).")

    def _check_task_tokens(self, input_ids: torch.LongTensor) -> None:
        """Refuse task tokens of tasks this model does not enable, naming the sample."""
        if not self._disabled_token_ids or not bool(
            torch.isin(input_ids, self._id_tensor("disabled", self._disabled_token_ids, input_ids)).any()
        ):
            return
        for task in TASK_NAMES:
            if task in self.config.tasks:
                continue
            ids = self.config.task_token_ids[task]
            strings = self.config.task_token_strings[task]
            for token_id, text in zip([ids["begin"], *ids["slots"]], [strings["begin"], *strings["slots"]]):
                hits = (input_ids == token_id).any(-1)
                if bool(hits.any()):
                    samples = hits.nonzero().flatten().tolist()
                    raise ValueError(
                        f"Sample(s) {samples} contain the token {text} (id {token_id}) of task '{task}', which this "
                        f"model does not enable (tasks={self.config.tasks}). Drop such samples or enable the task."
                    )

    def _check_task_labels(self, task_labels: torch.Tensor) -> None:
        if bool(torch.isin(task_labels, self._id_tensor("task_labels", self._valid_task_labels, task_labels)).all()):
            return
        allowed = [i for i, name in enumerate(ROUTER_CLASSES) if name == "text" or name in self.config.tasks]
        valid = task_labels == IGNORE_INDEX
        for label in allowed:
            valid |= task_labels == label
        if not bool(valid.all()):
            i = int((~valid).nonzero()[0])
            names = ", ".join(f"{k} ({ROUTER_CLASSES[k]})" for k in allowed)
            raise ValueError(
                f"Sample {i} has task label {int(task_labels[i])}; valid labels for this model are {names}, "
                f"or {IGNORE_INDEX} to ignore the sample."
            )

    def _temporal_targets(self, queries: TaskQueries, spans, span_query_index, saliency, num_frames: int) -> list[dict]:
        num_queries = queries.batch_index.numel()
        spans = spans.to(queries.batch_index.device).float()
        if span_query_index is None:
            if num_queries != 1:
                raise ValueError("Several temporal queries need `temporal_span_query_index` to assign the spans.")
            span_query_index = torch.zeros(spans.shape[0], dtype=torch.long, device=spans.device)
        span_query_index = span_query_index.to(spans.device).long()
        counts = torch.bincount(span_query_index, minlength=num_queries)
        if counts.numel() > num_queries or bool((counts[:num_queries] == 0).any()):
            samples = queries.batch_index.tolist()
            raise ValueError(
                f"The batch has {num_queries} temporal slot(s) (samples {samples}) but spans for queries "
                f"{sorted(set(span_query_index.tolist()))}; every temporal slot needs at least one target span."
            )
        bad = invalid_span_rows(spans)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            sample = int(queries.batch_index[span_query_index[j]])
            raise ValueError(f"Temporal span {spans[j].tolist()} of sample {sample} is invalid: spans are normalised "
                             "(start, end) by the video duration, with 0 <= start < end <= 1.")
        targets = []
        for q in range(num_queries):
            row = None
            if saliency is not None:
                row = saliency[q, :num_frames].to(spans.device).float()
                if row.numel() < num_frames:
                    row = F.pad(row, (0, num_frames - row.numel()))
            targets.append({"spans": spans[span_query_index == q], "saliency": row})
        return targets
