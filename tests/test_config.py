"""The config loader: a table of bad files, each naming the field and the problem."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, get_args

import pytest

from exporter.config import ConfigError, ImportEntry
from exporter.config.loader import load_config, load_config_apart, parse_config_text
from exporter.sources.elevate import ElevateConfig

ROOT = Path(__file__).resolve().parent.parent

ELEVATE = """
sources:
  - name: e
    type: elevate
    cluster_id: c1
    api_key: k-123456
    imports: [{id: "1"}]
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, "config.yaml")
    return caught.value.errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    interval: soon"),
            "config.yaml: sources[0].interval: must be a duration like 30s",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    interval: 0s"),
            "config.yaml: sources[0].interval: must be a duration greater than 0, like 30s",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    bogus: 1"),
            "config.yaml: sources[0].bogus: unknown field",
        ),
        (
            ELEVATE.replace("type: elevate", "type: sap"),
            "config.yaml: sources[0].type: must be one of",
        ),
        (
            ELEVATE.replace("    type: elevate\n", ""),
            "config.yaml: sources[0].type: must be one of",
        ),
        (ELEVATE.replace("api_key: k-123456", ""), "config.yaml: sources[0].api_key: required"),
        (
            ELEVATE.replace("api_key: k-123456", "api_key: k-123456\n    api_key_env: X"),
            "config.yaml: sources[0].api_key_env: give only one of",
        ),
        (
            ELEVATE.replace("api_key: k-123456", "api_key_env: SURELY_NOT_SET_42"),
            "config.yaml: sources[0].api_key_env: environment variable SURELY_NOT_SET_42",
        ),
        (
            ELEVATE.replace("api_key: k-123456", "api_key_file: /nonexistent/key"),
            "config.yaml: sources[0].api_key_file: cannot read /nonexistent/key",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    url: http://x"),
            "config.yaml: sources[0]: give exactly one of url and cluster_id",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "url: ftp://x"),
            "config.yaml: sources[0].url: must be an http:// or https:// URL",
        ),
        (
            ELEVATE.replace('[{id: "1"}]', '[{id: "1"}, {id: 1}]'),
            "config.yaml: sources[0].imports[1].id: '1' is listed twice",
        ),
        (
            ELEVATE.replace('[{id: "1"}]', '[{id: "a b"}]'),
            "config.yaml: sources[0].imports[0].id: must be 1-200 characters",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    timeout: 1m"),
            "config.yaml: sources[0].timeout: must not be longer than interval",
        ),
        (
            ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    concurrency: 0"),
            "config.yaml: sources[0].concurrency: Input should be greater than or equal to 1",
        ),
        (
            ELEVATE + ELEVATE.replace("sources:\n", ""),
            "config.yaml: sources[1].name: 'e' is already used",
        ),
        ("sources: {}", "config.yaml: sources: must be a list"),
        ("- 1", "config.yaml: the top level must be a mapping"),
        ("sources: [\n", "config.yaml: line"),
        (ELEVATE + "extra_top: 1\n", "config.yaml: extra_top: unknown field"),
        (
            """
sources:
  - name: z
    type: zilliant
    url: https://z.example
    forwarded_host: h
    imports: []
""",
            "config.yaml: sources[0]: give exactly one of token_json",
        ),
        (
            """
sources:
  - name: z
    type: zilliant
    url: https://z.example
    forwarded_host: h
    token_json: '{"no": "token"}'
""",
            "config.yaml: sources[0].token_json: must hold the Salesforce token response",
        ),
        (
            """
sources:
  - name: z
    type: zilliant
    url: https://z.example
    forwarded_host: h
    salesforce: {client_id: c, client_secret: s3cret-value}
""",
            "config.yaml: sources[0].salesforce.username: required for grant_type password",
        ),
        (
            """
sources:
  - name: r
    type: rocketchat
    url: https://chat.example
    user_id: u
""",
            "config.yaml: sources[0].auth_token: required",
        ),
    ],
)
def test_bad_config_names_file_field_and_problem(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(line.startswith(expected) for line in errors), errors


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x85", "\u2028", "\u2029"])
def test_control_characters_in_names_and_urls_are_refused(char: str) -> None:
    named = ELEVATE.replace('imports: [{id: "1"}]', 'imports: [{id: "1", name: "a%sb"}]')
    escaped = json.dumps(char)[1:-1]  # YAML double-quoted strings take JSON escapes
    code = f"U+{ord(char):04X}"
    errors = errors_of(named % escaped)
    assert errors == [
        f"config.yaml: sources[0].imports[0].name: must not contain control characters "
        f"(found {code})"
    ]
    url = ELEVATE.replace("cluster_id: c1", f'url: "https://e.example/x{escaped}"')
    assert errors_of(url) == [
        f"config.yaml: sources[0].url: must not contain control characters (found {code})"
    ]


def test_elevate_v3_is_deprecated_and_v4_the_default(tmp_path: Path) -> None:
    config = parse_config_text(ELEVATE, "config.yaml")
    (source,) = config.sources
    assert isinstance(source, ElevateConfig)
    assert source.api_version == "v4"
    assert source.deprecations() == []
    v3 = ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    api_version: v3")
    (source,) = parse_config_text(v3, "config.yaml").sources
    assert "end of life on 2026-12-31" in source.deprecations()[0]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(v3)
    result = run_cli("check-config", "--config.file", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "warning: source e: api_version v3" in result.stderr


def test_every_problem_is_reported_at_once() -> None:
    text = """
sources:
  - name: a
    type: elevate
    interval: soon
    cluster_id: c
    api_key: k-123456
  - name: b
    type: rocketchat
    url: http://chat
    user_id: u
    auth_token_file: /nonexistent/token
  - name: c
    type: unknown
"""
    errors = errors_of(text)
    assert errors == [
        "config.yaml: sources[0].interval: must be a duration like 30s",
        "config.yaml: sources[2].type: must be one of elevate, zilliant, rocketchat, http_json",
        "config.yaml: sources[1].auth_token_file: cannot read /nonexistent/token: "
        "No such file or directory",
    ]


def test_secrets_come_inline_from_env_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("file-secret-value\n")
    monkeypatch.setenv("ELEVATE_KEY_FOR_TEST", "env-secret-value")
    (tmp_path / "config.yaml").write_text(
        """
sources:
  - {name: a, type: elevate, cluster_id: c, api_key: inline-secret-value}
  - {name: b, type: elevate, cluster_id: c, api_key_env: ELEVATE_KEY_FOR_TEST}
  - {name: c, type: rocketchat, url: "http://chat", user_id: u, auth_token_file: token}
"""
    )
    config = load_config(tmp_path / "config.yaml")
    assert [s.secret("api_key") for s in config.sources[:2]] == [
        "inline-secret-value",
        "env-secret-value",
    ]
    assert config.sources[2].secret("auth_token") == "file-secret-value"


def test_defaults_and_durations() -> None:
    config = parse_config_text(
        ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    interval: 1h30m"), "x"
    )
    source = config.sources[0]
    assert source.interval == 5400
    assert (source.timeout, source.concurrency) == (10, 4)
    assert source.import_entries()[0].id == "1"


def test_numeric_id_keeps_every_digit() -> None:
    config = parse_config_text(ELEVATE.replace('{id: "1"}', "{id: 5537431447739019570}"), "x")
    assert config.sources[0].import_entries()[0].id == "5537431447739019570"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_example_config_is_valid_with_its_secrets_set() -> None:
    import os

    env = {
        **os.environ,
        "ELEVATE_API_KEY": "k-example-1",
        "SALESFORCE_CLIENT_SECRET": "cs-example-1",
        "SALESFORCE_PASSWORD": "pw-example-1",
        "ROCKETCHAT_AUTH_TOKEN": "rc-example-1",
    }
    result = run_cli("--config.file", "config.yaml", "--check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "OK (3 sources" in result.stdout


def test_check_config_exits_1_and_lists_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ELEVATE.replace("cluster_id: c1", "cluster_id: c1\n    interval: soon"))
    result = run_cli("check-config", "--config.file", str(bad))
    assert result.returncode == 1
    assert f"{bad}: sources[0].interval: must be a duration like 30s" in result.stderr


def test_retention_storage_and_api_tokens(tmp_path: Path) -> None:
    strong = "pipeline-token-0123456789"
    weak = "short-secret"
    (tmp_path / "tokens").write_text(f"# pipelines\n\n{strong}\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "retention: 2h\nstorage: {path: data/state.db}\napi: {tokens_file: tokens}\n" + ELEVATE
    )
    config = load_config(config_file)
    assert config.retention == 7200
    assert config.storage_path() == str(tmp_path / "data" / "state.db")
    assert config.api.tokens == (strong,)
    assert config.api.max_imports_per_source == 10_000

    # Defaults: no store path of its own, a day's retention, the write API off.
    default = parse_config_text(ELEVATE, "config.yaml")
    assert (default.retention, default.storage_path(), default.api.tokens) == (86400, None, ())

    (tmp_path / "tokens").write_text(f"{weak}\n")
    config_file.write_text(
        "retention: a day\nstorage: {path: 7}\napi: {tokens_file: tokens}\n" + ELEVATE
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    errors = caught.value.errors
    assert f"{config_file}: retention: must be a duration like 30s" in errors
    assert f"{config_file}: storage.path: Input should be a valid string" in errors
    assert (
        f"{config_file}: api.tokens_file: line 1: a token must be at least 16 characters "
        "without spaces" in errors
    )
    assert not any(weak in e for e in errors)  # a token is never echoed

    config_file.write_text("api: {tokens_file: missing, max_imports_per_source: 0}\n" + ELEVATE)
    errors = errors_of_file(config_file)
    assert any(e.startswith(f"{config_file}: api.max_imports_per_source:") for e in errors)
    config_file.write_text("api: {tokens_file: missing}\n" + ELEVATE)
    assert f"{config_file}: api.tokens_file: cannot read missing" in str(
        errors_of_file(config_file)
    )


def errors_of_file(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_the_registry_is_the_one_list_of_source_types() -> None:
    """Each registered type's model says its own type, and the loader's error
    for an unknown type lists exactly the registered ones."""
    from exporter.sources.registry import SOURCE_TYPES, SOURCES

    for source in SOURCES:
        field = source.config_model.model_fields["type"]
        assert field.annotation is not None
        assert get_args(field.annotation) == (source.system,), source
    assert SOURCE_TYPES == ("elevate", "zilliant", "rocketchat", "http_json")
    (error,) = errors_of("sources: [{name: x, type: sap}]")
    assert (
        error
        == "config.yaml: sources[0].type: must be one of elevate, zilliant, rocketchat, http_json"
    )


def test_checking_a_config_registers_no_secret_for_redaction() -> None:
    """Secrets are registered when a config is applied, not when it is parsed:
    check-config and a rejected reload add nothing to the redaction list."""
    from exporter import redact

    redact.clear_secrets()
    parse_config_text(ELEVATE.replace("k-123456", "only-parsed-secret"), "config.yaml")
    assert redact.redact("only-parsed-secret") == "only-parsed-secret"


def test_storage_url_is_a_secret_in_any_of_its_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://exporter:s3cret-pw@db.example:5432/imports"
    (tmp_path / "pg-url").write_text(url + "\n")
    monkeypatch.setenv("PG_URL_FOR_TEST", url)
    config_file = tmp_path / "config.yaml"
    for given in ("{url_file: pg-url}", "{url_env: PG_URL_FOR_TEST}", f"{{url: '{url}'}}"):
        config_file.write_text(f"storage: {given}\n" + ELEVATE)
        config = load_config(config_file)
        assert config.storage_url() == url
        assert config.storage_path() is None
        secrets = set(config.secret_values())
        assert {url, "s3cret-pw"} <= secrets  # redacted from logs once applied

    config_file.write_text("storage: {path: state.db, url_env: PG_URL_FOR_TEST}\n" + ELEVATE)
    assert errors_of_file(config_file) == [
        f"{config_file}: storage.url_env: give storage.path (SQLite) or storage.url "
        "(PostgreSQL), not both"
    ]
    monkeypatch.setenv("PG_URL_FOR_TEST", "mysql://exporter:s3cret-pw@db/imports")
    config_file.write_text("storage: {url_env: PG_URL_FOR_TEST}\n" + ELEVATE)
    errors = errors_of_file(config_file)
    assert errors == [f"{config_file}: storage.url_env: must be a postgresql:// URL"]
    config_file.write_text("storage: {url_file: missing}\n" + ELEVATE)
    assert f"{config_file}: storage.url_file: cannot read missing" in str(
        errors_of_file(config_file)
    )


APART = """
sources:
  - {name: a, type: elevate, cluster_id: c, api_key: inline-secret-value,
     imports: [{id: "1", name: catalogue}, {id: "2"}]}
  - {name: b, type: elevate, cluster_id: c, api_key_env: ELEVATE_KEY_FOR_TEST}
  - {name: c, type: rocketchat, url: "http://chat", user_id: u, auth_token_file: token}
"""


_BOTH_WAYS = """
import asyncio, json, os, signal, sys
from exporter.config import ConfigError
from exporter.config import loader

forks, child_signals = [], {}
fork, load_config = os.fork, loader.load_config

def spied_fork():
    pid = fork()
    if pid:
        forks.append(pid)
    return pid

def load_in_child(*args, **kwargs):
    if not forks:  # in the child (the parent appends once fork returns)
        wakeup = signal.set_wakeup_fd(-1)
        handlers = [signal.getsignal(n) is signal.SIG_DFL for n in (signal.SIGTERM, signal.SIGHUP)]
        with open(sys.argv[2], "w") as out:
            json.dump({"wakeup_fd": wakeup, "default_handlers": handlers}, out)
    return load_config(*args, **kwargs)

def outcome(load):
    try:
        config = load(sys.argv[1], expand_env=True)
    except ConfigError as exc:
        return config_errors(exc)
    return config, [list(source.secret_values()) for source in config.sources]

def config_errors(exc):
    return exc.errors

async def main():
    # As at start-up: inside the event loop, which handles SIGTERM.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
    os.fork, loader.load_config = spied_fork, load_in_child
    apart = outcome(loader.load_config_apart)
    os.fork, loader.load_config = fork, load_config
    here = outcome(loader.load_config)
    print(json.dumps({"forked": len(forks), "same": apart == here, "errors": here
                      if isinstance(here, list) else None}))

asyncio.run(main())
"""


def load_both_ways(path: Path) -> dict[str, Any]:
    """``path`` loaded in a fresh process by ``load_config_apart`` (from inside
    an event loop, as at start-up) and by ``load_config``: whether the child
    was forked, whether both are the same (secrets included), the errors."""
    seen = path.parent / "child.json"
    run = subprocess.run(
        [sys.executable, "-c", _BOTH_WAYS, str(path), str(seen)],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    result["child"] = json.loads(seen.read_text())
    return result


@pytest.mark.parametrize("recipe", ["", *sorted((ROOT / "examples" / "recipes").glob("*.yaml"))])
def test_a_config_loaded_in_a_child_process_is_the_config_loaded_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str | Path
) -> None:
    """Start-up parses the file in a forked child and unpickles the result:
    the same models, secrets included. Signals sent to the child are its own,
    not the event loop's."""
    (tmp_path / "token").write_text("file-secret-value\n")
    monkeypatch.setenv("ELEVATE_KEY_FOR_TEST", "env-secret-value")
    for name in ("SALESFORCE", "SHOPIFY"):
        monkeypatch.setenv(f"{name}_INSTANCE_URL", "https://instance.example")
        monkeypatch.setenv(f"{name}_TOKEN_URL", "https://instance.example/token")
        monkeypatch.setenv(f"{name}_SHOP_URL", "https://shop.example")
        monkeypatch.setenv(f"{name}_CLIENT_ID", "client-id")
        monkeypatch.setenv(f"{name}_CLIENT_SECRET", "client-secret-value")
        monkeypatch.setenv(f"{name}_ACCESS_TOKEN", "access-token-value")
    recipe_source = "  -\n" + textwrap.indent(Path(recipe).read_text(), "    ") if recipe else ""
    path = tmp_path / "config.yaml"
    path.write_text(APART + recipe_source)
    both = load_both_ways(path)
    assert both["forked"] == 1
    assert both["same"] is True
    assert both["errors"] is None
    assert both["child"] == {"wakeup_fd": -1, "default_handlers": [True, True]}


def test_a_listed_import_comes_back_from_a_pickle_as_it_was() -> None:
    """The child's config reaches start-up pickled: each listed import by
    value, equal, hashed alike and still frozen."""
    entries = [ImportEntry(id="7", name="nightly"), ImportEntry(id="8")]
    pickled = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"_import_entry" in pickled  # by value, not the dataclass's state methods
    back = pickle.loads(pickled)
    assert back == entries
    assert [hash(entry) for entry in back] == [hash(entry) for entry in entries]
    assert [type(entry) for entry in back] == [ImportEntry, ImportEntry]
    with pytest.raises(dataclasses.FrozenInstanceError):
        back[0].id = "9"


def test_a_broken_config_loaded_in_a_child_process_names_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(APART.replace("cluster_id: c,", "cluster_id: c, interval: soon,", 1))
    (tmp_path / "token").write_text("file-secret-value\n")
    both = load_both_ways(path)
    assert both["forked"] == 1
    assert both["same"] is True
    assert "sources[0].interval: must be a duration like 30s" in both["errors"][0]


def test_a_config_is_parsed_here_when_no_child_can_be_forked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of processes (a cgroup's pids.max): start-up goes on, and says why."""
    path = tmp_path / "config.yaml"
    path.write_text(ELEVATE)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(os, "fork", no_fork)
    config = load_config_apart(path)
    assert config == load_config(path)
    assert "cannot parse the config in a child process" in caplog.text


def test_an_unknown_key_of_a_listed_import_is_an_unknown_field() -> None:
    assert errors_of(ELEVATE.replace('{id: "1"}', '{id: "1", nmae: x}')) == [
        "config.yaml: sources[0].imports[0].nmae: unknown field"
    ]


_PARSE_GARBAGE = """
import os, re, sys, tempfile
from exporter.config.loader import load_config, load_config_apart
path = os.path.join(tempfile.mkdtemp(), "config.yaml")
with open(path, "w") as out:
    out.write("sources:\\n  - {name: a, type: elevate, cluster_id: c, api_key: k, imports: [\\n")
    out.write(",\\n".join(f"    {{id: i{n}, name: import {n}}}" for n in range(20000)) + "]}\\n")
config = (load_config_apart if sys.argv[1] == "apart" else load_config)(path)
assert len(config.sources[0].import_entries()) == 20000
read, write = os.pipe()
os.dup2(write, 2)
sys._debugmallocstats()
os.close(write)
os.close(2)
stats = os.read(read, 1 << 20).decode()
print(int(re.search(r"bytes in available blocks\\s+=\\s+([\\d,]+)", stats)[1].replace(",", "")))
"""


def test_the_parse_of_a_config_loaded_in_a_child_leaves_no_garbage_in_this_heap() -> None:
    """Freed blocks of the parse stay among the kept config's, never returned
    (1.6 KB of RSS per import): here there are none."""

    def free_bytes(how: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _PARSE_GARBAGE, how], capture_output=True, text=True, cwd=ROOT
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    here, apart = free_bytes("here"), free_bytes("apart")
    assert here > 10_000_000  # what the parse leaves behind when it runs here
    assert apart < here / 4
