"""The AWS shared configuration files, read as every S3 tool reads them (for what obstore,
which reads the environment only, leaves out).

A profile (``AWS_PROFILE``, else ``AWS_DEFAULT_PROFILE``, else ``default``) gives, from
``~/.aws/credentials`` (``AWS_SHARED_CREDENTIALS_FILE``) and ``~/.aws/config``
(``AWS_CONFIG_FILE``; sections ``[profile NAME]``, and ``[default]``):

- static credentials (``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``), unless the environment gives them (the environment comes first, as
  for the AWS CLI);
- ``region`` and ``endpoint_url``, unless ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and
  ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` are set.

A profile that gets its credentials another way (``role_arn``, ``sso_session``,
``credential_process``, ...) is refused in one line that says how to export them instead. A
profile named by the environment that neither file holds, or a file that does not parse, is
refused too, naming it. The values read are handed to the client and never kept, logged or
shown: an error names the profile and the file, never a value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    import configparser

__all__ = ["aws_profile"]

#: Keys of a profile that mean credentials come from elsewhere than the file.
_INDIRECT = ("role_arn", "credential_source", "credential_process", "sso_session", "sso_start_url")
_EXPORT = 'export them first: eval "$(aws configure export-credentials --format env)"'


def _read(path: Path, what: str) -> configparser.ConfigParser:
    """The file at ``path`` (empty when there is none)."""
    import configparser  # only a run over s3:// reads a profile (1 ms at every start-up)

    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parser
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the AWS {what} file {path}: {exc}") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigurationError(f"the AWS {what} file {path} does not parse: {first}") from None
    return parser


def _files(env: Mapping[str, str], home: Path) -> tuple[Path, Path]:
    credentials = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(home / ".aws" / "credentials")
    config = env.get("AWS_CONFIG_FILE") or str(home / ".aws" / "config")
    return Path(credentials).expanduser(), Path(config).expanduser()


def aws_profile(env: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """The client settings (obstore's ``S3Config`` keys: ``access_key_id``,
    ``secret_access_key``, ``session_token``, ``region``, ``endpoint``) the profile gives and
    the environment does not. Raises :class:`ConfigurationError` (see the module's doc)."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    named = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    name = named or "default"
    cred_path, conf_path = _files(env, home)
    creds, conf = _read(cred_path, "credentials"), _read(conf_path, "config")
    section = "default" if name == "default" else f"profile {name}"
    found: dict[str, str] = {}
    if conf.has_section(section):
        found.update(conf[section])
    if creds.has_section(name):
        found.update(creds[name])
    if not found:
        if named:
            raise ConfigurationError(
                f"AWS profile {name!r} (AWS_PROFILE) is in neither {cred_path} nor {conf_path}"
            )
        return {}
    out: dict[str, str] = {}
    if not env.get("AWS_ACCESS_KEY_ID"):
        if "aws_access_key_id" in found and "aws_secret_access_key" in found:
            out["access_key_id"] = found["aws_access_key_id"]
            out["secret_access_key"] = found["aws_secret_access_key"]
            if "aws_session_token" in found:
                out["session_token"] = found["aws_session_token"]
        elif indirect := [k for k in _INDIRECT if k in found]:
            raise ConfigurationError(
                f"AWS profile {name!r} gets its credentials through {indirect[0]}, which "
                f"asyncbatch does not follow: {_EXPORT}"
            )
    if "region" in found and not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        out["region"] = found["region"]
    endpoint = found.get("endpoint_url")
    if endpoint and not (env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")):
        out["endpoint"] = endpoint
    return out
