"""The REST client's configuration (environment over config file over defaults) and its SSE parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantfleet.client import DEFAULT_URL, ApiError, load_config, parse_sse


def test_environment_wins_over_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('url = "https://qf.internal/"\napi_key = "qf_file_key"\n')
    from_file = load_config({}, path)
    assert (from_file.url, from_file.api_key, from_file.source) == (
        "https://qf.internal",
        "qf_file_key",
        str(path),
    )
    env = load_config({"QF_API_URL": "http://10.0.0.5:8000", "QF_API_KEY": "qf_env_key"}, path)
    assert (env.url, env.api_key, env.source) == ("http://10.0.0.5:8000", "qf_env_key", "environment")
    only_key = load_config({"QF_API_KEY": "qf_env_key"}, path)
    assert (only_key.url, only_key.api_key) == ("https://qf.internal", "qf_env_key")


def test_xdg_config_home_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "quantfleet").mkdir()
    (tmp_path / "quantfleet" / "config.toml").write_text('api_key = "qf_xdg"\n')
    cfg = load_config({"XDG_CONFIG_HOME": str(tmp_path)})
    assert (cfg.url, cfg.api_key) == (DEFAULT_URL, "qf_xdg")
    nothing = load_config({"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert (nothing.url, nothing.api_key, nothing.source) == (DEFAULT_URL, None, "defaults")


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        ("url = ", {}, "not valid TOML"),
        ('url = "http://x"\ntoken = "a"\n', {}, "unknown setting"),
        ('url = "qf.internal"\n', {}, "must start with http"),
        ("", {"QF_API_URL": "ftp://x"}, "from environment"),
        ("api_key = 5\n", {}, "must be a string"),
    ],
)
def test_bad_configuration_says_what_to_fix(
    tmp_path: Path, text: str, env: dict[str, str], words: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ApiError, match=words):
        load_config(env, path)


def test_sse_parser_follows_the_event_stream_format() -> None:
    stream = [
        ": keep-alive",
        "id: 7",
        "event: progress",
        'data: {"stage": "quantize",',
        'data:  "layer": 2}',
        "",
        "",
        "retry: 1000",
        "id: 8",
        "event: end",
        'data: {"state": "succeeded"}',
        "",
    ]
    events = list(parse_sse(iter(stream)))
    assert [(e.id, e.event, e.data) for e in events] == [
        (7, "progress", {"stage": "quantize", "layer": 2}),
        (8, "end", {"state": "succeeded"}),
    ]
