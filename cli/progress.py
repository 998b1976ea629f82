"""Progress bars on stderr, so that --json output on stdout stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)


def describe(item) -> str:
    """What the bar says it is working on: a neighbourhood, a group of distillation jobs, a label."""
    if isinstance(item, str):
        return item
    if hasattr(item, "id"):
        return f"neighbourhood {item.id}"
    if isinstance(item, list) and item and hasattr(item[0], "neighbourhood"):
        return f"neighbourhood {item[0].neighbourhood}: {len(item)} candidates"
    return ""


def bar(items, total: int, label: str):
    """Yield from `items` with a bar: the stage, the current item, count and ETA."""
    columns = (TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[item]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(label, total=total, stage=label, item="")
        for item in items:
            progress.update(task, item=describe(item))
            yield item
            progress.advance(task)
