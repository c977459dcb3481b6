"""The status page at ``/``: the farm at a glance, rendered on the server, no build step.

It reloads itself every few seconds (a meta refresh: no script to run, and a browser that
cannot reach the server keeps showing the last state). Elements carry ids and ``data-``
attributes so that tests and scrapers need not parse the text.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

__all__ = ["REFRESH_SECONDS", "render_login", "render_status"]

REFRESH_SECONDS = 5

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { text-align: left; padding: .2em .8em .2em 0; border-bottom: 1px solid #ddd; vertical-align: top; }
th { font-weight: 600; }
.num { text-align: right; }
.state-up, .state-succeeded, .state-success, .state-reused { color: #176f2c; }
.state-down, .state-failed, .state-failure, .state-quarantined, .state-missing { color: #b3261e; }
.state-draining, .state-cordoned, .state-queued, .state-partial, .state-cancelled { color: #8a5a00; }
.state-running, .state-building, .state-syncing, .state-verifying, .state-assigned { color: #1a56b0; }
.muted { color: #777; }
code { font-size: 12px; }
"""


def render_status(server: dict[str, Any], nodes: list[dict[str, Any]], builds: list[dict[str, Any]]) -> str:
    running = [b for b in builds if b["state"] in ("queued", "running")]
    recent = [b for b in builds if b["state"] not in ("queued", "running")]
    now = time.time()
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>farm serve</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>farm serve</h1>",
        f'<p id="summary" data-queue="{server["queue_length"]}" data-running="{server["running"]}">'
        f"farm {escape(server['version'])} · inventory {escape(server['inventory'])} · "
        f"{server['running']} running (at most {server['max_builds']}) · {server['queue_length']} queued · "
        f'<span class="muted">updated {time.strftime("%H:%M:%S")}</span></p>',
        "<h2>Nodes</h2>",
        _nodes_table(nodes),
        "<h2>Running and queued builds</h2>",
        _builds_table("running", running, now) if running else '<p id="running" class="muted">none</p>',
        "<h2>Recent builds</h2>",
        _builds_table("recent", recent, now) if recent else '<p id="recent" class="muted">none yet</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def _nodes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [
        '<table id="nodes"><thead><tr><th>node</th><th>state</th><th>platform</th>'
        '<th class="num">busy / slots</th><th>last heartbeat</th><th>builder</th><th>problem</th>'
        "</tr></thead><tbody>"
    ]
    for node in nodes:
        age = node["heartbeat_age"]
        heard = "never" if age is None else f"{_duration(age)} ago"
        rows.append(
            f'<tr data-node="{escape(node["name"])}" data-state="{escape(node["state"])}" '
            f'data-platform="{escape(node["platform"])}" '
            f'data-busy="{node["busy"]}" data-slots="{node["slots"]}">'
            f"<td>{escape(node['name'])}</td>"
            f'<td class="state-{escape(node["state"])}">{escape(node["state"])}</td>'
            f"<td>{escape(node['platform'])}</td>"
            f'<td class="num">{node["busy"]} / {node["slots"]}</td>'
            f"<td>{heard}</td>"
            f"<td>{escape(node['builder'] or '-')}</td>"
            f'<td class="muted">{escape(node["problem"] or "")}</td></tr>'
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _builds_table(table_id: str, builds: list[dict[str, Any]], now: float) -> str:
    rows = [
        f'<table id="{table_id}"><thead><tr><th>build</th><th>tags</th><th>submitter</th><th>state</th>'
        "<th>platform</th><th>node</th><th>mode</th><th class=num>seconds</th><th>when</th>"
        "</tr></thead><tbody>"
    ]
    for build in builds:
        platforms = build.get("platform_results") or [
            {"platform": name, "node": None, "mode": None, "seconds": None, "state": "queued"}
            for name in build["platforms"]
        ]
        span = max(1, len(platforms))
        started = build.get("started_at") or build["submitted_at"]
        ended = build.get("ended_at")
        when = f"{_duration(now - started)} ago" if ended is None else f"took {_duration(ended - started)}"
        head = (
            f'<td rowspan="{span}"><code>{escape(build["id"])}</code></td>'
            f'<td rowspan="{span}">{"<br>".join(escape(tag) for tag in build["tags"])}</td>'
            f'<td rowspan="{span}">{escape(build["submitter"])}</td>'
            f'<td rowspan="{span}" class="state-{escape(build["state"])}">{escape(build["state"])}'
            + (f'<br><span class="muted">{escape(build["error"])}</span>' if build.get("error") else "")
            + "</td>"
        )
        for index, item in enumerate(platforms):
            state = item.get("state") or ""
            seconds = item.get("seconds")
            cells = (
                f'<td class="state-{escape(state)}">{escape(item["platform"])}</td>'
                f"<td>{escape(item.get('node') or '-')}</td>"
                f"<td>{escape(item.get('mode') or '-')}</td>"
                f'<td class="num">{"-" if seconds is None else f"{seconds:.1f}"}</td>'
            )
            tail = f'<td rowspan="{span}">{when}</td>' if index == 0 else ""
            attributes = (
                f'data-build="{escape(build["id"])}" data-platform="{escape(item["platform"])}" '
                f'data-node="{escape(item.get("node") or "")}" data-mode="{escape(item.get("mode") or "")}" '
                f'data-build-state="{escape(build["state"])}"'
            )
            rows.append(f"<tr {attributes}>{head if index == 0 else ''}{cells}{tail}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def render_login() -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>farm serve</title></head><body>"
        "<h1>farm serve</h1><p>This page needs the server's token. Open it once as "
        "<code>/?token=TOKEN</code> (the token is in the state folder's <code>token</code> file); "
        "the browser then keeps it in a cookie for this server.</p></body></html>"
    )
