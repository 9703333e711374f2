"""Jinja2's sandbox with resource bounds, for templates that come from a UI form.

`SandboxedEnvironment` refuses attribute escapes but not work: `9 ** (9 ** 9)`, `'a' * 3000000000`,
`'%1900000000s' % x`, nested `range` loops, a macro that calls itself twice, or a `{% set %}` block
that captures a loop's output all run to the end, pin a CPU or fill memory. Here every render runs
under a `Budget`:
- steps: each loop iteration and each call (a macro, a method, a global) is one; at most
  `MAX_STEPS`, and a render past `RENDER_SECONDS` stops at its next step (a backstop: the steps
  decide, the same on every read of the input, so the plan and the generation pass agree);
- size: every value a template builds (an operator's result, a filter's or method's output, a list
  or dict literal, a captured block, an output) is sized *before* it is built, as the characters
  `str()` would print (a list holding one string a thousand times counts it a thousand times),
  and refused past the budget's `max_chars`; integers are capped at `MAX_INT_DIGITS`.
A breach raises `RenderLimit` (a Jinja2 `TemplateRuntimeError`): `templates.render` makes it a bad
line, as any other error while rendering a record.
"""

from __future__ import annotations

import inspect
import itertools
import re
import string
import time
from collections import deque
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import update_wrapper

from jinja2 import StrictUndefined, TemplateRuntimeError, Undefined, nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

MAX_CHARS = 1 << 22  # a value's size where no render budget is set (4 Mi characters)
MAX_STEPS = 100_000  # loop iterations and calls per render: Jinja2's own cap on one range()
RENDER_SECONDS = 10.0
MAX_INT_DIGITS = 10_000  # beyond any number a prompt prints (str() refuses past 4,300 digits anyway)


class RenderLimit(TemplateRuntimeError):
    """A render went past its budget: too many steps, too long, or a value too large."""


@dataclass
class Budget:
    """What one render may spend."""

    max_chars: int = MAX_CHARS
    steps: int = MAX_STEPS
    deadline: float = field(default_factory=lambda: time.monotonic() + RENDER_SECONDS)

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderLimit(f"more than {MAX_STEPS} loop iterations and calls: simplify the template's loops or recursion")
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise RenderLimit(f"rendering took longer than {RENDER_SECONDS:g} s: simplify the template")


_BUDGET: ContextVar[Budget | None] = ContextVar("render_budget", default=None)


@contextmanager
def budget(max_chars: int):
    """Renders inside this block share one fresh budget (one record's)."""
    token = _BUDGET.set(Budget(max_chars))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _step() -> None:
    if (b := _BUDGET.get()) is not None:
        b.step()


def _limit() -> int:
    b = _BUDGET.get()
    return MAX_CHARS if b is None else b.max_chars


def size_of(value, limit: int | None = None) -> int:
    """About how many characters `str(value)` prints, counted until past `limit`. Iterative (a
    deep list is no recursion) and reference-counting: shared items count each time they occur."""
    if type(value) is str:  # the common case (every output piece of a prompt): its length, exactly as below
        return len(value)
    limit = _limit() if limit is None else limit
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, Undefined):  # StrictUndefined raises on any use: its str() is an error, not text
            continue
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1  # decimal digits, about
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(itertools.chain.from_iterable(itertools.islice(v.items(), limit)))
        elif isinstance(v, (list, tuple, set, frozenset, deque, KeysView, ValuesView, ItemsView)):
            total += 2 + 2 * len(v)
            stack.extend(itertools.islice(v, limit))
        elif isinstance(v, Namespace):  # its repr shows its attributes
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += 64  # other objects print as a type and an address
    return total


def _check(size: int, what: str) -> None:
    if size > (limit := _limit()):
        raise RenderLimit(f"{what} would build about {size} characters, over the limit of {limit}")


def _sized(value, what: str):
    _check(size_of(value), what)
    return value


def _int(value) -> int:
    return abs(value) if isinstance(value, int) else 0


# -- What an operation would build, from its operands (None: nothing beyond its inputs' sizes).

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 12 else 10 ** 12


def _values(args) -> list:
    if isinstance(args, dict):
        return list(args.values())
    return list(args) if isinstance(args, tuple) else [args]


def printf_size(fmt, args) -> int:
    """`fmt % args`: the text, every width and precision, and the arguments (a `*` width is one of them)."""
    widths, star = 0, False
    for m in _PRINTF.finditer(fmt):
        for g in m.group(1, 2):
            star |= g == "*"
            widths += _number(g) if g and g != "*" else 0
    values = _values(args)
    return len(fmt) + widths + sum(size_of(v) for v in values) + (sum(map(_int, values)) if star else 0)


def format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """`fmt.format(*args, **kwargs)`: as printf_size; a nested `{:{w}}` spec takes its width from an argument."""
    widths, nested = 0, False
    for _literal, _field, spec, _conversion in string.Formatter().parse(fmt):
        if spec:
            nested |= "{" in spec
            widths += sum(_number(d) for d in re.findall(r"\d+", spec))
    values = [*args, *kwargs.values()]
    return len(fmt) + widths + sum(size_of(v) for v in values) + (sum(map(_int, values)) if nested else 0)


def _replaced(s, old, new, count=None) -> int | None:
    if not all(isinstance(x, str) for x in (s, old, new)):
        return None
    n = s.count(old)  # for old == "": len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def int_digits(operator: str, left, right) -> int | None:
    """About the decimal digits of an integer `left * right` or `left ** right` (None: not one)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return None
    if operator == "**":  # 9 ** (9 ** 9) is refused before it is computed
        return right * abs(left).bit_length() * 3 // 10 if abs(left) > 1 and right > 0 else 1
    return (left.bit_length() + right.bit_length()) * 3 // 10 if operator == "*" else None


def binop_size(operator: str, left, right) -> int | None:
    """The characters of `left <operator> right`, for the operators that can outgrow their operands."""
    if operator == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and not isinstance(seq, (int, float)):
            return size_of(seq) * max(n, 0)
    if operator == "%" and isinstance(left, str):
        return printf_size(left, right)
    if operator == "+" and not isinstance(left, (int, float)):
        return size_of(left) + size_of(right)
    return None


def _str_method_size(obj, name: str, args: tuple, kwargs: dict) -> int | None:
    """The str (or bytes) methods whose output can outgrow their string."""
    arg = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(obj), _int(arg))
    if name == "expandtabs":
        return len(obj) + obj.count("\t" if isinstance(obj, str) else b"\t") * _int(arg if args else kwargs.get("tabsize", 8))
    if name == "replace" and len(args) >= 2:
        return _replaced(obj, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
    if name == "join" and isinstance(arg, list):
        return sum(size_of(x) for x in arg) + len(obj) * len(arg)
    return None


def _lipsum_size(n=5, html=True, min=20, max=100) -> int:  # noqa: A002 - lipsum's own parameter names
    return _int(n) * _int(max) * 12


# -- Filters: the ones whose output can outgrow their input, sized from their bound arguments.

_FILTER_SIZES: dict[str, Callable[[dict], int | None]] = {
    "center": lambda a: max(size_of(a["value"]), _int(a["width"])),
    "indent": lambda a: size_of(a["s"]) + (a["s"].count("\n") + 1 if isinstance(a["s"], str) else size_of(a["s"]))
                        * (len(a["width"]) if isinstance(a["width"], str) else _int(a["width"])),
    "replace": lambda a: _replaced(a["s"], a["old"], a["new"], a["count"]),
    "wordwrap": lambda a: size_of(a["s"]) + (size_of(a["s"]) // max(_int(a["width"]), 1) + 1) * len(a["wrapstring"] or "\n")
                          if isinstance(a["wrapstring"], (str, type(None))) else None,
    "batch": lambda a: size_of(a["value"]) + (_int(a["linecount"]) * (2 + size_of(a["fill_with"])) if a["fill_with"] is not None else 0),
    "slice": lambda a: size_of(a["value"]) + _int(a["slices"]) * (2 + size_of(a["fill_with"])),
    "join": lambda a: sum(size_of(x) for x in a["value"]) + len(str(a["d"])) * len(a["value"]),
    "sum": lambda a: None if isinstance(a["start"], (int, float)) else size_of(a["start"]) + sum(size_of(x) for x in a["value"]),
    "format": lambda a: printf_size(a["value"], a["kwargs"] or a["args"]) if isinstance(a["value"], str) else None,
}
# Whatever a filter is given, a value too large to print is too large to turn into text.
_TEXT_FILTERS = ("string", "tojson", "pprint", "xmlattr", "e", "escape", "forceescape", "urlencode", "urlize")
_MATERIALIZED = ("join", "sum")  # they take any iterable: sized as a list, then given that list


def _bounded_filter(name: str, func: Callable) -> Callable:
    signature = inspect.signature(func)
    params = list(signature.parameters)
    sizer = _FILTER_SIZES.get(name)
    # Jinja2 passes the context, environment or eval context first when the filter asks for one;
    # an async variant's signature (its sync function's) may leave that argument out.
    passed = getattr(func, "jinja_pass_arg", None) is not None
    in_signature = passed and params[0] in ("context", "eval_ctx", "environment")
    value_at = 1 if passed else 0  # where the filtered value is in the arguments

    def bounded(*args, **kwargs):
        if name in _MATERIALIZED and len(args) > value_at and not isinstance(args[value_at], (str, Undefined)):
            args = (*args[:value_at], list(args[value_at]), *args[value_at + 1:])
        if sizer is not None:
            try:
                bound = signature.bind(*(args if in_signature or not passed else args[1:]), **kwargs)
            except TypeError:
                return func(*args, **kwargs)  # the filter's own error names the arguments
            bound.apply_defaults()
            a = {**bound.arguments, "value": bound.arguments[params[1 if in_signature else 0]]}
            if (size := sizer(a)) is not None:
                _check(size, f"the filter {name}")
        elif name in _TEXT_FILTERS and len(args) > value_at:
            _check(size_of(args[value_at]), f"the filter {name}")
        return func(*args, **kwargs)

    return update_wrapper(bounded, func)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles templates so that loops step the budget and literals and `~` are sized."""

    def visit_For(self, node: nodes.For, frame) -> None:
        # The iterable goes through environment.steps (via environment.call, itself a step):
        # nested loops are bounded as a whole, not MAX_RANGE per range() call.
        node.iter = nodes.Call(nodes.EnvironmentAttribute("steps"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _sized_literal(self, visit, node, frame) -> None:
        self.write("environment.sized(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame) -> None:
        self._sized_literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame) -> None:
        self._sized_literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame) -> None:
        if node.ctx == "load":
            self._sized_literal(super().visit_Tuple, node, frame)
        else:  # an assignment target: {% for a, b in ... %}
            super().visit_Tuple(node, frame)


class _Steps:
    """A loop's iterable, each item a step of the budget."""

    def __init__(self, iterable):
        self._source = iterable
        self._items = iter(iterable)

    def __iter__(self):
        return self

    def __next__(self):
        _step()
        return next(self._items)

    def __len__(self) -> int:  # loop.length, without reading the items ahead
        return len(self._source)


_DICT_ATTRIBUTES = frozenset(dir(dict))


class BoundedEnvironment(SandboxedEnvironment):
    """The sandbox, with every step and every value a template builds bounded (module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options) -> None:
        # optimized=False: no constant folding, so no template code runs at compile time, outside a budget.
        super().__init__(undefined=StrictUndefined, optimized=False, finalize=self._output, **options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def _output(value):
        if type(value) is str:  # most outputs: a field's text, sized by its length (as size_of would)
            _check(len(value), "an output")
            return value
        return _sized(value, "an output")

    def getattr(self, obj, attribute):
        """`ex.topic` on a plain dict (a record's or an example's fields): its item at once. A plain
        dict has no instance attributes, so a name that is not a dict method is never an attribute:
        the sandbox's own lookup would fail on it, then return the item (or an undefined) as here."""
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    @staticmethod
    def concat(parts) -> str:
        """The text of a macro, a captured block or the whole template: sized before it is joined."""
        parts = list(parts)
        _check(sum(map(len, parts)), "a block's output")
        return "".join(parts)

    @staticmethod
    def concat_values(values: tuple) -> str:
        """`a ~ b`."""
        _check(sum(size_of(v) for v in values), "the ~ operator")
        return "".join(map(str, values))

    @staticmethod
    def sized(value):
        return _sized(value, "a literal")

    @staticmethod
    def steps(iterable) -> _Steps:
        return _Steps(iterable)

    def call_binop(self, context, operator: str, left, right):
        if (digits := int_digits(operator, left, right)) is not None:
            if digits > MAX_INT_DIGITS:
                raise RenderLimit(f"{operator} would build an integer of about {digits} digits, over {MAX_INT_DIGITS}")
        elif (size := binop_size(operator, left, right)) is not None:
            _check(size, f"the {operator} operator")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - the sandbox's own signature
        _step()
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)):
            if name == "join" and args and not isinstance(args[0], (str, bytes)):
                args = (list(args[0]), *args[1:])
            size = _str_method_size(owner, name, args, kwargs)
        elif __obj is generate_lorem_ipsum:
            size = _lipsum_size(*args, **kwargs)
        elif name == "fromkeys" and args:
            size = (len(args[0]) if hasattr(args[0], "__len__") else 0) * (2 + size_of(args[1] if len(args) > 1 else None))
        elif isinstance(__obj, type) or isinstance(owner, (list, dict, set, deque)):
            # dict(a=x, b=x), namespace(...), cycler(...), l.extend(l): a structure built from the arguments
            size = sum(size_of(a) for a in (*args, *kwargs.values()))
        else:  # a macro, loop(), caller(): their text is sized as it is joined (concat)
            size = None
        if size is not None:
            _check(size, f"calling {name or 'a function'}")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def bounded(*args, **kwargs):
            _check(format_size(fmt, (), args[0]) if is_map and args and isinstance(args[0], dict)
                   else format_size(fmt, args, kwargs), f"str.{value.__name__}")
            return wrapped(*args, **kwargs)

        return update_wrapper(bounded, value)
