"""The routing plan: which optimizer owns each parameter, why, and with what settings.

``optimizer.plan(params)`` returns a :class:`Plan`. It is built from the routes the optimizer
actually uses (giving ``params`` routes and initialises them first, exactly as a step
would), so the plan that is printed is the plan that runs. It prints as a table (with
``rich`` when installed), exports to dict, JSON and Markdown, and two plans can be diffed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

from treeopt import _text
from treeopt._trees import dotted
from treeopt.backends import as_float, backend_of
from treeopt.routing import Member, Route
from treeopt.state import SlotStore
from treeopt.types import Array, Keys, Options, Shape

if TYPE_CHECKING:  # rich is optional: imported where a plan is printed with it
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["Plan", "Row", "Group", "PlanDiff", "build"]


@dataclass(frozen=True)
class Row:
    """One parameter of the plan."""

    path: str
    group: int  # index of its optimizer in the plan's groups; -1 when frozen
    optimizer: str  # the optimizer's name, or "frozen"
    reason: str  # why: "filters[0] (is_hidden_matrix)", "fallback", "frozen"
    shape: tuple[int, ...]
    dtype: str
    size: int
    state_bytes: int
    learning_rate: float | None = None  # at the next step, after schedules
    weight_decay: float | None = None
    also_matched: tuple[str, ...] = ()  # other filters that accept the path (the first one won)
    notes: tuple[str, ...] = ()  # guard warnings
    owner: str | None = None  # under ZeRO-1: the rank that updates it ("0"), or "rows" (split over every rank)
    #: options its rule takes for this parameter alone (Muon's ``layout`` of a ``Conv1D``)
    options: dict[str, Any] = field(default_factory=dict)
    #: how its slots are stored, when its optimizer has a ``state_dtype``: "int8/256, uint8/256", "float32"...
    state_dtype: str | None = None


@dataclass(frozen=True)
class Group:
    """One optimizer of the plan, with its totals."""

    index: int
    name: str
    type: str
    parameters: int
    size: int
    state_bytes: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    #: the optimizer's ``state_dtype`` (``None``: the parameters' dtype)
    state_dtype: str | None = None


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _nbytes(array: Array) -> int:
    backend = backend_of(array)
    assert backend is not None  # a slot: the state setter checks that it is an array
    return backend.nbytes(array)


def _number(x: float | None) -> str:
    return _text.number(x)


@dataclass
class Plan:
    step: int
    groups: list[Group]
    rows: list[Row]
    changes: list[str] = field(default_factory=list)  # freezes, re-routes... in order
    warnings: list[str] = field(default_factory=list)
    #: under ZeRO-1, one dict per rank: parameters, state_bytes, ns_gflop (Newton-Schulz per
    #: step), sent_bytes (parameter values it sends per step)
    ranks: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "groups": [asdict(g) for g in self.groups],
            "ranks": [dict(r) for r in self.ranks],
            "parameters": [
                dict(asdict(r), shape=list(r.shape), also_matched=list(r.also_matched), notes=list(r.notes))
                for r in self.rows
            ],
            "changes": list(self.changes),
            "warnings": list(self.warnings),
        }

    def judgement_calls(self) -> list[Row]:
        """The rows whose route follows a documented rule for a layer the recipe does not
        settle (MoE routers, poolers, 1x1 and depthwise convolutions, relative-position
        tables): their reason says the rule."""
        return [row for row in self.rows if "judgement call" in row.reason]

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        groups = [Group(**g) for g in data["groups"]]
        rows = [
            Row(
                **dict(
                    _renamed(r), shape=tuple(r["shape"]), also_matched=tuple(r["also_matched"]), notes=tuple(r["notes"])
                )
            )
            for r in data["parameters"]
        ]
        return cls(
            data["step"],
            groups,
            rows,
            list(data.get("changes", [])),
            list(data.get("warnings", [])),
            [dict(r) for r in data.get("ranks", [])],
        )

    def _table(self):
        header = ["path", "optimizer", "reason", "shape", "dtype", "size", "state", "lr", "wd", "notes"]
        body = [
            [
                r.path,
                r.optimizer,
                r.reason,
                "x".join(map(str, r.shape)) or "()",
                r.dtype,
                f"{r.size:,}",
                _human(r.state_bytes),
                _number(r.learning_rate),
                _number(r.weight_decay),
                "; ".join(
                    ([", ".join(f"{k}={v}" for k, v in r.options.items())] if r.options else [])
                    + ([f"also matched filters{list(r.also_matched)}"] if r.also_matched else [])
                    + list(r.notes)
                ),
            ]
            for r in self.rows
        ]
        if not any(row[-1] for row in body):  # no note anywhere: drop the column
            header, body = header[:-1], [row[:-1] for row in body]
        if any(r.state_dtype is not None for r in self.rows):  # a state_dtype: how each is stored
            at = header.index("state") + 1
            header = header[:at] + ["stored as"] + header[at:]
            body = [row[:at] + [r.state_dtype or "-"] + row[at:] for row, r in zip(body, self.rows)]
        if any(r.owner is not None for r in self.rows):  # ZeRO-1: who updates each parameter
            header = header[:2] + ["owner"] + header[2:]
            body = [row[:2] + ["-" if r.owner is None else r.owner] + row[2:] for row, r in zip(body, self.rows)]
        totals = [["group", "type", "parameters", "size", "state", "hyper-parameters"]] + [
            [
                f"{g.index}: {g.name}",
                g.type,
                str(g.parameters),
                f"{g.size:,}",
                _human(g.state_bytes),
                ", ".join(
                    f"{k}={_number(v) if isinstance(v, float) else v}"
                    for k, v in g.hyperparameters.items()
                    if k not in ("learning_rate", "weight_decay") or v is not None
                ),
            ]
            for g in self.groups
        ]
        if any(g.state_dtype is not None for g in self.groups):
            totals = [totals[0][:5] + ["state_dtype", "bytes/param"] + totals[0][5:]] + [
                row[:5] + [g.state_dtype or "-", f"{g.state_bytes / g.size:.2f}" if g.size else "-"] + row[5:]
                for row, g in zip(totals[1:], self.groups)
            ]
        return header, body, totals

    def _ranks_table(self):
        """Under ZeRO-1, each rank's share: its own table (a rank is not a group)."""
        if not self.ranks:
            return []
        return [["rank", "parameters", "state", "Newton-Schulz", "sends per step"]] + [
            [
                str(r["rank"]),
                str(r["parameters"]),
                _human(r["state_bytes"]),
                f"{r['ns_gflop']:.3g} GFLOP",
                _human(r["sent_bytes"]),
            ]
            for r in self.ranks
        ]

    def to_markdown(self) -> str:
        header, body, totals = self._table()

        def table(rows):
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]

        parts = [f"**Routing plan at step {self.step}**", ""] + table([header] + body) + [""] + table(totals)
        if self.ranks:
            parts += [""] + table(self._ranks_table())
        parts += [""] + [f"- {line}" for line in self.changes + self.warnings]
        return "\n".join(parts).rstrip() + "\n"

    def __str__(self) -> str:
        return self.text()

    def text(self, width: int | None = None) -> str:
        """The plan as plain text. A filter's name is given once, under the table, where its
        rows say ``filters[i]``. With ``width``, the paths, reasons, notes and hyper-parameters
        are folded onto more lines (never cut) to fit that many columns."""
        return "\n".join(line for line, _ in self._lines(width))

    def _lines(self, width):
        """``(line, is a title or header)`` of the text rendering, to fit ``width`` (None: any)."""
        header, body, totals = self._table()
        reason = header.index("reason")
        filters: dict[str, str] = {}
        for row in body:  # "filters[1] (is_bias | is_norm): ..." on every row: its name once, below
            match = re.fullmatch(r"(filters\[\d+\]) \(([^()]+)\)(.*)", row[reason])
            if match and filters.setdefault(match[1], match[2]) == match[2]:
                row[reason] = match[1] + match[3]
        title = f"Routing plan at step {self.step}"

        def too_wide(rows):
            return width is not None and max(map(len, _text.table(rows))) > width

        # a narrow terminal: a dtype shared by every row goes in the title; size (the shape's
        # product) goes; hyper-parameters go below the groups, one group a line
        i = header.index("dtype")
        if body and too_wide([header] + body) and len({row[i] for row in body}) == 1:
            title += f" (every parameter {body[0][i]})"
            header, body = header[:i] + header[i + 1 :], [row[:i] + row[i + 1 :] for row in body]
        i = header.index("size")
        if too_wide([header] + body):
            header, body = header[:i] + header[i + 1 :], [row[:i] + row[i + 1 :] for row in body]
        # then the reason is said shorter: "filters[1]: norm" without why it is a norm, then
        # "filters[1]" alone (plan.rows keep the whole reason)
        for keep in (2, 1):
            if too_wide([header] + body):
                body = [row[:reason] + [": ".join(row[reason].split(": ")[:keep])] + row[reason + 1 :] for row in body]
        hyper = []
        if too_wide(totals):
            hyper = [f"{row[0]}  {row[-1]}" for row in totals[1:]]
            totals = [row[:-1] for row in totals]
        long = {header.index(c) for c in ("path", "reason", "notes") if c in header}
        parts = [(title, True)]
        for rows, foldable in (([header] + body, long), (totals, {0, len(totals[0]) - 1}), (self._ranks_table(), ())):
            if rows:
                lines = _text.table(rows, width, foldable)
                parts += [(lines[0], True)] + [(line, False) for line in lines[1:]]
                parts += [(line, False) for text in hyper if rows is totals for line in _text.hanging(text, width)]
                parts.append(("", False))
        notes = [f"{name}: {text}" for name, text in sorted(filters.items())] + self.changes + self.warnings
        for note in notes:
            parts += [(line, False) for line in _text.hanging(f"* {note}", width, 2)]
        return parts if notes else parts[:-1]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text  # optional: only a rich console calls this

        for line, title in self._lines(options.max_width):
            yield Text(line, style="bold" if title else "")

    def print(self, file: IO[str] | None = None) -> None:
        """Print the plan to fit the terminal (``$COLUMNS``, else 100 columns when ``file`` is
        not a terminal), its headers styled when ``rich`` is installed."""
        try:
            from rich.console import Console  # optional, as above
        except ImportError:
            print(self.text(_text.terminal_width()), file=file)
        else:
            console = Console(file=file)
            if not console.is_terminal:
                console = Console(file=file, width=_text.terminal_width())
            console.print(self, soft_wrap=True)  # lines already fit: no second wrapping

    # ------------------------------------------------------------------ diff
    def diff(self, other: Plan) -> PlanDiff:
        """What changed from this plan to ``other`` (e.g. after a model change)."""
        mine, theirs = {r.path: r for r in self.rows}, {r.path: r for r in other.rows}
        moved, changed = [], []
        for path in mine.keys() & theirs.keys():
            a, b = mine[path], theirs[path]
            if a.optimizer != b.optimizer:
                moved.append((path, a.optimizer, b.optimizer))
            elif (a.shape, a.dtype) != (b.shape, b.dtype):
                changed.append((path, f"{a.dtype}{list(a.shape)}", f"{b.dtype}{list(b.shape)}"))
        return PlanDiff(
            added=sorted(theirs.keys() - mine.keys()),
            removed=sorted(mine.keys() - theirs.keys()),
            moved=sorted(moved),
            changed=sorted(changed),
        )


@dataclass
class PlanDiff:
    added: list[str]
    removed: list[str]
    moved: list[tuple[str, str, str]]  # (path, from optimizer, to optimizer)
    changed: list[tuple[str, str, str]]  # (path, before, after): shape or dtype

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.moved or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if not self:
            return "no change"
        lines = [f"+ {p}" for p in self.added] + [f"- {p}" for p in self.removed]
        lines += [f"~ {p}: {a} -> {b}" for p, a, b in self.moved + self.changed]
        return "\n".join(lines)


def _renamed(row):
    """A row of a plan exported before ``rule`` was called ``reason``."""
    return {("reason" if k == "rule" else k): v for k, v in row.items()}


# ---------------------------------------------------------------------------------- building
class _Router(Protocol):
    """What a plan reads of a router (:mod:`treeopt.routing`)."""

    @property
    def changes(self) -> list[str]: ...

    def table(self) -> list[tuple[Keys, Route, Any]]: ...

    def warnings(self) -> list[str]: ...


def _predicted_bytes(store: SlotStore, shape: Shape, dtype: str, options: Options) -> int:
    """State bytes of a parameter that has no state yet, from what its store would keep for
    it, routed with ``options``."""
    try:
        expected = store.expected(shape, dtype, options=options)
        return sum(math.prod(s.shape) * _itemsize(s.dtype) for s in expected.values())
    except Exception:
        return 0


def _itemsize(dtype: str) -> int:
    return 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize


def _stored_as(store: SlotStore, keys: Keys, shape: Shape, dtype: str, options: Options | None) -> str | None:
    """How a parameter's slots are stored, for an optimizer with a ``state_dtype`` (routed
    with ``options``; ``None``: as its slots were made)."""
    if store.precision is None:
        return None
    try:
        layout = store.layout(shape, dtype, keys, options)
    except Exception:
        return None
    if layout is None:
        return dtype
    return ", ".join(dict.fromkeys(form.name for form in layout.forms.values())) or "-"


def build(groups: list[Member], router: _Router) -> Plan:
    """The plan of the groups ``router`` routes to, from the routes and state they hold."""
    group_of = {id(member.group): i for i, member in enumerate(groups)}
    hyper = {
        id(member.group): json.loads(json.dumps(member.group.scalars.current()))  # tuples as lists
        for member in groups
    }
    rows = []
    totals = {i: [0, 0, 0] for i in range(len(groups))}
    for keys, route, owner in router.table():
        path, shape, dtype = dotted(keys), route.shape, route.dtype
        if owner is None:
            rows.append(Row(path, -1, "frozen", route.reason, shape, dtype, math.prod(shape), 0))
            continue
        slots = owner.store.slots(keys) or {}
        if slots:
            state_bytes = sum(_nbytes(v) for v in slots.values())
        else:
            state_bytes = _predicted_bytes(owner.store, shape, dtype, route.options)
        group = group_of[id(owner)]
        values = hyper[id(owner)]
        rows.append(
            Row(
                path,
                group,
                groups[group].name,
                route.reason,
                shape,
                dtype,
                math.prod(shape),
                state_bytes,
                values.get("learning_rate"),
                values.get("weight_decay"),
                route.also,
                route.notes,
                options=dict(route.options),
                state_dtype=_stored_as(owner.store, keys, shape, dtype, None if slots else route.options),
            )
        )
        totals[group][0] += 1
        totals[group][1] += math.prod(shape)
        totals[group][2] += state_bytes
    summary = [
        Group(
            i,
            member.name,
            type(member.group).__name__,
            totals[i][0],
            totals[i][1],
            totals[i][2],
            hyper[id(member.group)],
            None if member.group.store.precision is None else member.group.store.precision.describe(),
        )
        for i, member in enumerate(groups)
    ]
    step = int(as_float(groups[0].group.store.tree["step"]))
    return Plan(step, summary, rows, list(router.changes), router.warnings())
