"""Frozen record classes without the ``dataclasses`` module.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``) and compiles each class's methods at import: a third of what
loading a card key used to import.  The records on that path (TokenInfo,
ParsedUri, CardKey, ...) need only this: fields from annotations, keyword
or positional construction, defaults, ``field(repr=False)``, equality,
hashing and immutability.  Type checkers see the real ``dataclasses``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import FrozenInstanceError, dataclass, field
else:
    _MISSING = object()

    class FrozenInstanceError(AttributeError):
        """Assigning to a field of a frozen record."""

    class _Field:
        __slots__ = ("default", "repr")

        def __init__(self, default, repr):
            self.default, self.repr = default, repr

    def field(*, default=_MISSING, repr=True):
        """A field's default and whether its repr shows it."""
        return _Field(default, repr)

    def dataclass(cls=None, /, *, frozen=False):
        """Give ``cls`` the methods of a dataclass (init, repr, eq, and for a
        frozen one hash and no assignment)."""

        def wrap(cls):
            return _make(cls, frozen)

        return wrap if cls is None else wrap(cls)

    def _make(cls, frozen):
        fields = []  # (name, default, shown in repr), base classes' first
        for base in reversed(cls.__mro__[1:]):
            for inherited in base.__dict__.get("_record_fields", ()):
                fields = [f for f in fields if f[0] != inherited[0]]
                fields.append(inherited)
        # A class's own annotations (3.10 and later: never its bases'), strings here.
        for name in getattr(cls, "__annotations__", {}):
            value = cls.__dict__.get(name, _MISSING)
            default, shown = (value.default, value.repr) if isinstance(value, _Field) else (value, True)
            if default is _MISSING and name in cls.__dict__:
                delattr(cls, name)
            elif isinstance(value, _Field):
                setattr(cls, name, default)
            fields = [f for f in fields if f[0] != name]
            fields.append((name, default, shown))
        names = tuple(f[0] for f in fields)
        shown_names = tuple(f[0] for f in fields if f[2])
        qualname = cls.__qualname__

        def __init__(self, *args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{qualname}() takes {len(names)} arguments but {len(args)} were given")
            values = dict(zip(names, args))
            for key, value in kwargs.items():
                if key not in names or key in values:
                    raise TypeError(f"{qualname}() got an unexpected or repeated argument {key!r}")
                values[key] = value
            for name, default, _ in fields:
                if name not in values:
                    if default is _MISSING:
                        raise TypeError(f"{qualname}() missing required argument: {name!r}")
                    values[name] = default
            for name in names:  # in field order, as dataclasses does
                object.__setattr__(self, name, values[name])

        def __repr__(self):
            return f"{qualname}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in shown_names) + ")"

        def _values(self):
            return tuple(getattr(self, n) for n in names)

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return _values(self) == _values(other)

        cls._record_fields = tuple(fields)
        # As dataclasses does: a method the class body defines itself (a
        # __repr__ that must not show a secret) is kept.
        own = cls.__dict__
        if "__init__" not in own:
            cls.__init__ = __init__
        if "__repr__" not in own:
            cls.__repr__ = __repr__
        if "__eq__" not in own:
            cls.__eq__ = __eq__
        if frozen:

            def __setattr__(self, name, value):
                raise FrozenInstanceError(f"cannot assign to field {name!r}")

            def __delattr__(self, name):
                raise FrozenInstanceError(f"cannot delete field {name!r}")

            def __hash__(self):
                return hash(_values(self))

            cls.__setattr__ = __setattr__
            cls.__delattr__ = __delattr__
            if own.get("__hash__") is None:
                cls.__hash__ = __hash__
        elif "__hash__" not in own:
            cls.__hash__ = None
        return cls


__all__ = ["FrozenInstanceError", "dataclass", "field"]
