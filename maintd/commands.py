"""Every maintctl command, declared once: its name, typed arguments, who may run it, whether it waits for a deploy,
and how maintctl prints its answer.

The socket server checks requests against this table (unknown commands, wrong types, who may change things) and
looks up the handler of the same name; maintctl builds its command line, its requests and its output from it. So
adding a command is one entry here and its handler in `handlers.py` (the server refuses to start if the two
disagree). Standard library only: maintctl imports this and must start in a few tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class BadRequest(Exception):
    """A request that cannot be carried out as sent; the message goes back to the peer."""


class Arg(NamedTuple):
    """One argument: a key of the request's `args` and an option (or positional) of maintctl. (Named tuples, not
    dataclasses: importing `dataclasses` would cost maintctl a third of its start-up.)"""

    name: str
    type: type = str  # str, int or bool (a flag)
    default: Any = None
    help: str = ""
    positional: bool = False
    choices: tuple[str, ...] = ()  # a positional with choices is a sub-command (`maintenance on`)
    of: str = ""  # an option that belongs to one choice of the sub-command (`--reason` of `maintenance on`)
    short: str = ""
    local: bool = False  # maintctl's own (`--json`): never sent

    def check(self, raw: Mapping[str, Any]) -> Any:
        value = raw.get(self.name)
        if value is None:
            if self.choices and self.default is None:
                raise BadRequest(f"args.{self.name} must be one of {', '.join(repr(c) for c in self.choices)}")
            return self.default
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadRequest(f"args.{self.name} must be a whole number")
        if self.type is not int and not isinstance(value, self.type):
            raise BadRequest(f"args.{self.name} must be {'true or false' if self.type is bool else 'a string'}")
        if self.choices and value not in self.choices:
            raise BadRequest(f"args.{self.name} must be one of {', '.join(repr(c) for c in self.choices)}")
        return value


def _always(args: Mapping[str, Any]) -> bool:
    return True


def _never(args: Mapping[str, Any]) -> bool:
    return False


class Command(NamedTuple):
    name: str
    help: str
    action: str  # what a refused peer was not allowed to do: "turn maintenance on or off"
    show: Callable[[Any], str]  # the answer as maintctl prints it without --json
    args: tuple[Arg, ...] = ()
    changes: Callable[[Mapping[str, Any]], bool] = _always  # only root and control.group may; others only read
    waits: Callable[[Mapping[str, Any]], bool] = _never  # may wait for a deploy in progress (maintctl: no timeout)

    def check(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The request's args, typed and with defaults, or BadRequest naming the first that is wrong."""
        sub = next((arg for arg in self.args if arg.choices), None)
        chosen = sub.check(raw) if sub else ""
        return {arg.name: arg.check(raw) for arg in self.args
                if not arg.local and (not arg.of or arg.of == chosen)}

    def wire(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """maintctl's parsed command line as the request's args."""
        return {arg.name: values[arg.name] for arg in self.args if not arg.local and arg.name in values}


# --- how answers are printed ------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def duration(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def size(value: float | None) -> str:
    if value is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while value >= 1024 and step < len(units) - 1:
        value, step = value / 1024, step + 1
    return f"{value:.0f} B" if step == 0 else f"{value:.1f} {units[step]}"


def when(epoch: float | None) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds") if epoch else "-"


def step_line(event: Mapping[str, Any]) -> str:
    """One step of a deploy as `--follow` prints it."""
    return (f"  {event['step']:<16} {event['result']:<12} {duration(event['duration_ms']):>9}  "
            f"{event['message']}")


def show_status(s: Mapping[str, Any]) -> str:
    m, deploying, last = s["maintenance"], s["deploying"], s["last_deploy"]
    if m["on"] and m["by"]:
        maintenance = f"on: {m['reason']} (by {m['by']} since {m['since']}" + (
            f", until {m['until']})" if m["until"] else ")")
    elif m["on"]:
        maintenance = "on (deploy in progress)"
    else:
        maintenance = "off" + (f" (operator maintenance set by {m['by']}, flag missing)" if m["by"] else "")
    rows = [
        ("app", s["app"] + (f" (maintd {s['version']})" if s.get("version") else "")),
        ("current", s["current"] or "none (no live release)"),
        ("previous", s.get("previous") or "-"),
        ("maintenance", maintenance),
        ("paused", "yes (automatic deploys stopped)" if s["paused"] else "no"),
        ("deploying", f"{deploying['release']}: {deploying['step'] or 'starting'} ({deploying['kind']} by "
                      f"{deploying['actor']})" if deploying else "-"),
        ("last deploy", f"{last['release']} {last['result']} in {duration(last['duration_ms'])} "
                        f"({last.get('kind', 'deploy')}, {last.get('finished', '')})"
                        + (f": {last['error']}" if last.get("error") else "") if last else "-"),
    ]
    if s.get("uploading"):
        rows.append(("uploading", ", ".join(s["uploading"])))
    for hook in s.get("webhooks", []):  # scheme://host/… only: the rest of a webhook's URL may be its secret
        failure = hook["last_failure"]
        rows.append(("webhook", f"{hook['url']} ({hook['format']}): {hook['sent']} sent, {hook['dropped']} dropped"
                                + (f", {hook['waiting']} waiting" if hook["waiting"] else "")
                                + (f"; last failure {failure['at']}: {failure['error']}" if failure else "")))
    return "\n".join(f"{key:<12} {value}" for key, value in rows)


def show_releases(rows: list[Mapping[str, Any]]) -> str:
    return table(["NAME", "STATE", "SIZE", "UPLOADED", "NOTE"],
                 [[r["name"], r["state"], size(r["size"]), when(r["uploaded_at"]), r["reason"] or ""] for r in rows])


def show_history(entries: list[Mapping[str, Any]]) -> str:
    return table(["STARTED", "KIND", "RELEASE", "RESULT", "DURATION", "ACTOR", "ERROR"],
                 [[h["started"], h["kind"], h["release"], h["result"], duration(h["duration_ms"]), h["actor"],
                   h.get("error", "")] for h in entries])


def show_went_live(result: Mapping[str, Any]) -> str:
    return (f"release {result['release']} is live ({result['kind']} {result['deploy_id']}, "
            f"{duration(result['duration_ms'])})")


def show_maintenance(result: Mapping[str, Any]) -> str:
    return "maintenance on: " + result["reason"] if result["on"] else "maintenance off"


def show_single_step(result: Mapping[str, Any]) -> str:
    return f"{result['step']}: {result['message']} (release {result['release']})"


def show_paused(result: Mapping[str, Any]) -> str:
    return "automatic deploys paused" if result["paused"] else "automatic deploys resumed"


def show_cluster(c: Mapping[str, Any]) -> str:
    if "aborted" in c:
        return f"switch {c['aborted']['id']} of release {c['aborted']['release']} aborted"
    if "ended" in c:
        return (f"switch {c['ended']['id']} of release {c['ended']['release']} was decided already "
                f"({c['ended']['decision']}): ended; a member still in it finishes by that decision")
    batched = any(m.get("batch") for m in c["members"])  # a rolling switch: each member's batch
    members = table(["MEMBER", "ALIVE", "CURRENT", "STATE", *(["BATCH"] if batched else [])],
                    [[m["name"] + (" (this one)" if m["name"] == c["member"] else ""), "yes" if m["alive"] else "NO",
                      m["current"] or "-", m["state"], *([str(m["batch"])] if batched else [])]
                     for m in c["members"]])
    switch = c["switch"]
    if c.get("unreadable"):
        return members + ("\nswitch: unknown: a value this maintd cannot read holds the switch key: "
                          + str(c["unreadable"])[:200])
    if not switch:
        return members + "\nswitch: none in progress"
    strategy = switch.get("strategy", "together") + (f" ({switch['why']})" if switch.get("why") else "")
    if switch.get("batch"):
        strategy += f"; batch {switch['batch']} of {len(switch['batches'])} in progress"
    return members + (f"\nswitch: {switch['id']}: {switch['kind']} of release {switch['release']} "
                      f"(digest {switch['digest'][:12]}), begun by {switch['by']} for {switch['actor']} at "
                      f"{when(switch['since'])}; decision: {switch['decision'] or 'none yet'}"
                      + (f" ({switch['reason']})" if switch.get("reason") else "") + f"\nstrategy: {strategy}")


def show_json(result: Any) -> str:
    import json

    return json.dumps(result, indent=2, default=str)


JSON = Arg("json", bool, False, "print the answer as JSON", local=True)
RELEASE = Arg("release", str, "", positional=True)
FOLLOW = Arg("follow", bool, False, "print each step as it happens; joins NAME's deploy that is running, or the one "
             "maintd ran by itself last")
WAIT = Arg("wait", bool, False, "wait for a running deploy instead of refusing")

COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("status", "live release, maintenance, deploy in progress", "read the status", show_status,
            (JSON,), changes=_never),
    Command("releases", "every release and its state", "list releases", show_releases, (JSON,), changes=_never),
    Command("history", "past deploys and rollbacks", "read the history", show_history,
            (Arg("n", int, 20, "how many, newest last", short="-n"), JSON), changes=_never),
    Command("deploy", "deploy NAME (default: the newest complete release)", "deploy releases", show_went_live,
            (RELEASE, FOLLOW, WAIT), waits=_always),
    Command("rollback", "back to NAME (default: the previous release)", "roll back", show_went_live,
            (RELEASE, FOLLOW, WAIT), waits=_always),
    Command("maintenance", "operator maintenance on or off", "turn maintenance on or off", show_maintenance,
            (Arg("state", str, positional=True, choices=("on", "off")),
             Arg("reason", str, "", "why, shown on the page", of="on"),
             Arg("until", str, "", "when it is expected to end, shown on the page (as HH:MM or an ISO date and "
                 "time, also its Retry-After)", of="on")),
            waits=lambda args: args.get("state") == "off"),
    Command("restart", "restart the app on the live release", "restart the app", show_single_step, waits=_always),
    Command("flush", "flush memcached", "flush memcached", show_single_step, waits=_always),
    Command("cluster", "every member and the switch in progress (cluster mode); `cluster abort` ends the switch",
            "abort the cluster's switch", show_cluster,
            (Arg("action", str, "show", positional=True, choices=("show", "abort")), JSON),
            changes=lambda args: args.get("action") == "abort"),
    Command("pause", "stop automatic deploys of uploads", "pause automatic deploys", show_paused),
    Command("resume", "restart automatic deploys", "resume automatic deploys", show_paused),
)}
