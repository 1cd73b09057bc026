"""Choose the training and validation rows, with Replicate's meaning of its inputs."""

from __future__ import annotations

from tunery.data.jsonl import Dataset
from tunery.errors import TuneryError


def split_train_validation(
    train: Dataset,
    validation: Dataset | None,
    *,
    num_validation_samples: int,
    run_validation: bool,
    min_train_rows: int = 1,
) -> tuple[list[dict], list[dict]]:
    """Return (training rows, validation rows), each in file order.

    * ``run_validation`` False: every train row trains, no validation (``validation`` is
      ignored, as Replicate does).
    * no ``validation`` file: the last ``num_validation_samples`` train rows validate and the
      rest train. TuneryError if fewer than ``min_train_rows`` would be left to train on.
    * a ``validation`` file: every train row trains, and the first ``num_validation_samples``
      validation rows (or all, if it has fewer) validate. TuneryError if the two files are
      not in the same format.
    """
    if num_validation_samples < 0:
        raise ValueError(f"num_validation_samples must be >= 0, got {num_validation_samples}")
    if not run_validation:
        return list(train.rows), []

    if validation is None:
        n = len(train.rows)
        left = n - num_validation_samples
        if left < min_train_rows:
            would_leave = f"only {left} training rows" if left > 0 else "no training rows"
            need = "" if min_train_rows == 1 else f" (at least {min_train_rows} are needed)"
            raise TuneryError(
                f"{train.name} has {n} rows; num_validation_samples={num_validation_samples} would leave "
                f"{would_leave}{need}: lower num_validation_samples, pass validation_data, "
                "or set run_validation=false"
            )
        # Slice by the count, not rows[-k:]: for k == 0 that would take every row.
        return list(train.rows[:left]), list(train.rows[left:])

    if validation.format != train.format:
        raise TuneryError(
            f"{validation.name} has {validation.format} rows but {train.name} has {train.format} rows; "
            "training and validation data must use the same format"
        )
    return list(train.rows), list(validation.rows[:num_validation_samples])
