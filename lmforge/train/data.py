"""The labelled data of a fine-tuning run: a GLUE task or the user's own files."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError


@dataclass
class TaskData:
    name: str
    train: list            # Example(text, pair, label, line)
    dev: list
    labels: list[str] | None   # None = regression
    metrics: list[str]
    main_metric: str

    @property
    def regression(self) -> bool:
        return self.labels is None


def is_nlg_task(task: str | None) -> bool:
    """A data-to-text task (data/nlg.py: e2e, webnlg, dart), which a decoder learns to generate."""
    from lmforge.data.nlg import TASKS
    return task in TASKS


def _cap(rows: list, n: int | None) -> list:
    return rows if n is None else rows[:n]


def load_task_data(cfg) -> TaskData:
    """From cfg.task (e.g. "glue/sst2") or cfg.train_file + cfg.dev_file (CSV, TSV or JSONL)."""
    if cfg.task and cfg.train_file:
        raise ConfigError("give --task or --train/--dev files, not both")
    if cfg.task:
        from lmforge.data.glue import get_task, load_split

        task = get_task(cfg.task)
        train = load_split(task, "train", cfg.data_dir)
        dev = load_split(task, "dev", cfg.data_dir)
        return TaskData(f"glue/{task.name}", _cap(train, cfg.max_train_samples),
                        _cap(dev, cfg.max_eval_samples), task.labels, list(task.metrics), task.main_metric)
    if not (cfg.train_file and cfg.dev_file):
        raise ConfigError("give --task, or both --train and --dev files")
    from lmforge.data.tables import load_table

    kw = dict(text_col=cfg.text_col, pair_col=cfg.pair_col, label_col=cfg.label_col,
              skip_bad_rows=cfg.skip_bad_rows)
    train, labels, report = load_table(cfg.train_file, label_type=cfg.label_type, **kw)
    dev, _, dev_report = load_table(cfg.dev_file, label_type="float" if labels is None else "class",
                                    labels=labels, **kw)
    for r in (report, dev_report):
        if getattr(r, "skipped", 0):
            print(f"skipped bad rows: {r}", flush=True)
    if labels is None:
        metrics, main = ["pearson", "spearman"], "pearson"
    else:
        metrics = ["accuracy", "f1"] if len(labels) == 2 else ["accuracy"]
        main = "accuracy"
    return TaskData(str(cfg.train_file), _cap(train, cfg.max_train_samples),
                    _cap(dev, cfg.max_eval_samples), labels, metrics, main)


def load_eval_split(args, split: str, labels: list[str] | None) -> TaskData:
    """One split to evaluate a trained model on: a GLUE split, or --dev (else --train) file.
    `labels` are the model's own, so an unknown label in the file is reported, not invented."""
    if getattr(args, "task", None):
        from lmforge.data.glue import get_task, load_split

        task = get_task(args.task)
        rows = _cap(load_split(task, split, args.data_dir), args.max_eval_samples)
        return TaskData(f"glue/{task.name}", [], rows, task.labels, list(task.metrics), task.main_metric)
    path = args.dev_file or args.train_file
    if not path:
        raise ConfigError("give --task, or a labelled file with --dev")
    from lmforge.data.tables import load_table

    rows, labels, _ = load_table(path, text_col=args.text_col, pair_col=args.pair_col, label_col=args.label_col,
                                 label_type="float" if labels is None else "class", labels=labels,
                                 skip_bad_rows=args.skip_bad_rows)
    if labels is None:
        return TaskData(str(path), [], rows, None, ["pearson", "spearman"], "pearson")
    return TaskData(str(path), [], _cap(rows, args.max_eval_samples), labels,
                    ["accuracy", "f1"] if len(labels) == 2 else ["accuracy"], "accuracy")
