"""Scriptable fault injection: what the clients must survive.

A :class:`FaultPlan` is a list of :class:`FaultRule`. WebSocket rules are evaluated for every
candle message the simulator is about to send on a connection, subscription rules when a
client subscribes to a pair, REST rules for every HTTP request. ``message`` counts the candle
events scheduled on the connection (from 1, whether or not a fault then drops them; control
messages and snapshots are not counted). All filters of a rule must match; then
``probability`` is drawn from the rule's own seeded RNG and the rule fires at most ``times``
times (0: unlimited). Every firing is recorded in :attr:`FaultEngine.fired`.

WebSocket kinds (``exchange``, ``connection`` = nth connection to that exchange from 1,
``pair``, ``message``, ``min_second`` = second of the minute of the event >= this,
``finals_only``):

* ``close``: a clean close (close frame 1000) instead of sending the message.
* ``disconnect``: an abrupt TCP reset instead of sending the message.
* ``stall``: the socket stays open but nothing is sent and pings are not answered for
  ``duration_s`` wall seconds; ``then`` = ``resume`` (events due meanwhile are lost, like a
  real stall) | ``close`` | ``disconnect``.
* ``malformed``: a bad frame (``variant``: truncated, garbage, binary, empty, wrong_types,
  nan, negative, high_low) before the real one, or instead of it with ``replace``.
* ``out_of_order``: the message is held back and sent after the next one.
* ``duplicate``: the message is sent twice (``finals_only`` defaults to true for it).
* ``late_final``: the final (Binance ``x:true``; Kraken: the minute's last update) is sent
  ``delay_s`` sim seconds late, or just after the next hour starts with ``until="next_hour"``.
* ``subscribe_error``: subscribing to ``pair`` is refused with the exchange's error.

REST kinds (``exchange``, ``endpoint`` = substring of the path, ``pair``, ``request`` = nth
matching request from 1): ``http_429`` (Binance 429 + Retry-After; Kraken
``EGeneral:Too many requests``), ``http_418`` (Binance ban + Retry-After), ``http_5xx``
(``status``, default 503), ``slow`` (answer after ``duration_s``), ``timeout`` (never answer:
hold for ``duration_s`` then reset the connection).

Archive kinds (``exchange``, ``endpoint`` = part of the file name, e.g. ``BTCUSD-1m-2026-01``;
decided once per file, see :mod:`klined.sim.archive`): ``archive_missing``,
``archive_bad_checksum``, ``archive_truncated``, ``archive_bad_row``, ``archive_revised``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from klined.sim.clock import wall_ms

WS_KINDS = frozenset(
    {"close", "disconnect", "stall", "malformed", "out_of_order", "duplicate", "late_final"}
)
SUBSCRIBE_KINDS = frozenset({"subscribe_error"})
REST_KINDS = frozenset({"http_429", "http_418", "http_5xx", "slow", "timeout"})
ARCHIVE_KINDS = frozenset(
    {"archive_missing", "archive_bad_checksum", "archive_truncated", "archive_bad_row",
     "archive_revised"}
)  # fmt: skip
FAULT_KINDS = WS_KINDS | SUBSCRIBE_KINDS | REST_KINDS | ARCHIVE_KINDS
MALFORMED_VARIANTS = frozenset(
    {"truncated", "garbage", "binary", "empty", "wrong_types", "nan", "negative", "high_low"}
)


class FaultRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: str
    exchange: str | None = None
    connection: int | None = None
    pair: str | None = None
    message: int | None = None
    min_second: float | None = None
    finals_only: bool | None = None
    endpoint: str | None = None
    request: int | None = None
    probability: float = 1.0
    times: int = 1
    duration_s: float = 5.0
    delay_s: float = 65.0
    until: str | None = None
    variant: str = "truncated"
    replace: bool = False
    then: str = "resume"
    status: int | None = None
    retry_after_s: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.exchange not in (None, "binance", "kraken"):
            raise ValueError(f"fault exchange must be binance or kraken, not {self.exchange!r}")
        if self.variant not in MALFORMED_VARIANTS:
            raise ValueError(f"unknown malformed variant {self.variant!r}")
        if self.then not in ("resume", "close", "disconnect"):
            raise ValueError("stall 'then' must be resume, close or disconnect")
        if self.until not in (None, "next_hour"):
            raise ValueError("late_final 'until' must be omitted or 'next_hour'")
        if not 0.0 <= self.probability <= 1.0 or self.times < 0:
            raise ValueError("probability must be in [0, 1] and times >= 0")

    @property
    def only_finals(self) -> bool:
        if self.finals_only is not None:
            return self.finals_only
        return self.kind in ("duplicate", "late_final")


class FaultPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The rules, plus the seed of their probability draws (default: the simulator's seed)."""

    rules: list[FaultRule] = msgspec.field(default_factory=list)
    seed: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> FaultPlan:
        """Read a plan from a ``.json`` or ``.toml`` file (``[[rules]]`` tables in TOML)."""
        p = Path(path)
        data = p.read_bytes()
        try:
            if p.suffix.lower() == ".toml":
                return msgspec.toml.decode(data, type=cls)
            return msgspec.json.decode(data, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ValueError(f"{p}: invalid fault plan: {exc}") from exc


class FiredFault(msgspec.Struct, kw_only=True):
    rule: int  # index in the plan
    kind: str
    exchange: str
    wall_ms: int
    sim_ms: int | None = None
    connection: int | None = None
    pair: str | None = None
    minute: int | None = None
    message: int | None = None
    request: int | None = None
    detail: str = ""


@dataclass
class _RuleState:
    rng: random.Random
    fired: int = 0
    matched_requests: int = 0


@dataclass
class FaultEngine:
    """Evaluates a plan; the WebSocket and REST servers ask it before each message/request."""

    plan: FaultPlan
    seed: int
    fired: list[FiredFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = self.plan.seed if self.plan.seed is not None else self.seed
        self._state = [
            _RuleState(random.Random(f"{base}/{i}/{r.kind}")) for i, r in enumerate(self.plan.rules)
        ]

    def _take(self, index: int, rule: FaultRule) -> bool:
        state = self._state[index]
        if rule.times and state.fired >= rule.times:
            return False
        if rule.probability < 1.0 and state.rng.random() >= rule.probability:
            return False
        state.fired += 1
        return True

    def on_message(
        self,
        exchange: str,
        connection: int,
        message: int,
        pair: str,
        event_ms: int,
        is_final: bool,
    ) -> list[tuple[int, FaultRule]]:
        """The WebSocket rules that fire for this candle message, in plan order."""
        out = []
        for i, rule in enumerate(self.plan.rules):
            if rule.kind not in WS_KINDS:
                continue
            if rule.exchange not in (None, exchange) or rule.pair not in (None, pair):
                continue
            if rule.connection is not None and rule.connection != connection:
                continue
            if rule.message is not None and rule.message != message:
                continue
            if rule.min_second is not None and (event_ms % 60_000) < rule.min_second * 1000:
                continue
            if rule.only_finals and not is_final:
                continue
            if self._take(i, rule):
                out.append((i, rule))
        return out

    def on_subscribe(
        self, exchange: str, connection: int, pair: str
    ) -> tuple[int, FaultRule] | None:
        for i, rule in enumerate(self.plan.rules):
            if rule.kind not in SUBSCRIBE_KINDS:
                continue
            if rule.exchange not in (None, exchange) or rule.pair not in (None, pair):
                continue
            if rule.connection is not None and rule.connection != connection:
                continue
            if self._take(i, rule):
                return i, rule
        return None

    def on_request(
        self, exchange: str, path: str, pair: str | None
    ) -> tuple[int, FaultRule] | None:
        """The first REST rule that fires for this request (``request`` counts matches)."""
        for i, rule in enumerate(self.plan.rules):
            if rule.kind not in REST_KINDS:
                continue
            if rule.exchange not in (None, exchange):
                continue
            if rule.endpoint is not None and rule.endpoint not in path:
                continue
            if rule.pair is not None and rule.pair != pair:
                continue
            state = self._state[i]
            state.matched_requests += 1
            if rule.request is not None and rule.request != state.matched_requests:
                continue
            if self._take(i, rule):
                return i, rule
        return None

    def on_archive(self, exchange: str, name: str) -> str | None:
        """The variant of a Binance archive file (``bad_row`` for ``archive_bad_row``...), from
        the first archive rule that fires for it; None: the file is as it should be."""
        for i, rule in enumerate(self.plan.rules):
            if rule.kind not in ARCHIVE_KINDS or rule.exchange not in (None, exchange):
                continue
            if rule.endpoint is not None and rule.endpoint not in name:
                continue
            if self._take(i, rule):
                self.record(i, rule, exchange, wall_ms(), detail=name)
                return rule.kind.removeprefix("archive_")
        return None

    def record(
        self,
        index: int,
        rule: FaultRule,
        exchange: str,
        wall_ms: int,
        *,
        sim_ms: int | None = None,
        connection: int | None = None,
        pair: str | None = None,
        minute: int | None = None,
        message: int | None = None,
        request: int | None = None,
        detail: str = "",
    ) -> None:
        self.fired.append(
            FiredFault(
                rule=index,
                kind=rule.kind,
                exchange=exchange,
                wall_ms=wall_ms,
                sim_ms=sim_ms,
                connection=connection,
                pair=pair,
                minute=minute,
                message=message,
                request=request,
                detail=detail,
            )
        )

    def fired_kinds(self) -> list[str]:
        return [f.kind for f in self.fired]
