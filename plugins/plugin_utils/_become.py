# PRIVATE to the collection: not a public API, may change without notice.
"""Describe a become step as a *hop* the mux can start: any become plugin.

Runs on: the controller (Ansible workers).

The stock become plugin builds the command exactly as it would for vanilla
Ansible, wrapping the command that starts an agent
(:func:`ansible_mitogen_svc.bootstrap.agent_command`), and its prompt,
success marker and error texts become the hop's fields (see
:mod:`ansible_mitogen_svc.connect` for the hop format). The agent that
runs the command types the password when the prompt appears, on a pty,
never on a command line.

Typical use, from a connection plugin::

    hop = become_hop(self.become, self._shell, python, timeout)
    reply = client.connection_call("get", timeout + 30,
                                   spec=dict(base_spec, chain=[hop]))
"""
from __future__ import annotations

import hashlib
import re
import typing as t
from gettext import dgettext

from ansible.module_utils.common.text.converters import to_text

from ansible_collections.mitogen.svc.ansible_mitogen_svc import bootstrap

__all__ = ["become_hop", "prompt_regex", "GENERIC_PROMPT"]

#: For plugins whose ``prompt`` is not a string (doas, most third-party
#: ones): any line ending in "password...:".
GENERIC_PROMPT = r"(?i)password[^\n]*:\s*$"
#: Replaces the plugin's per-command random id in the hop's identity.
_ID_MASK = "{become-id}"
#: What build_become_command() changes on the plugin instance.
_STATE = ("_id", "success", "prompt")


def _option(become: t.Any, name: str) -> t.Any:
    try:
        return become.get_option(name)
    except KeyError:  # a plugin without that option
        return None


def prompt_regex(become: t.Any) -> str:
    """A regex matching ``become``'s password prompt at the end of output.
    Call after ``build_become_command`` (sudo sets its prompt there)."""
    localized = getattr(become, "SU_PROMPT_LOCALIZATIONS", None)
    if localized is not None:
        # su: a localized word, then a colon (or a fullwidth one), as
        # its check_password_prompt() accepts.
        words = _option(become, "prompt_l10n") or localized
        return r"(?i)(?:%s)\s*[:\uff1a]\s*$" % "|".join(re.escape(to_text(w)) for w in words)
    prompt = become.prompt
    if isinstance(prompt, bytes):
        prompt = to_text(prompt)
    if isinstance(prompt, str) and prompt.strip():
        # BecomeBase.check_password_prompt() looks for the prompt anywhere
        # in the output: some plugins set only its first bytes ("doas (").
        return re.escape(prompt.strip()) + r"[^\n]*$"
    return GENERIC_PROMPT


def _texts(become: t.Any, messages: t.Iterable[str]) -> list[str]:
    # As BecomeBase.check_*_password(): the message in the plugin's
    # translation domain, so localized targets are recognised alike.
    return [to_text(dgettext(become.name, m)) for m in messages if m]


def become_hop(become: t.Any, shell: t.Any, python: str, timeout: float) -> dict[str, t.Any]:
    """The hop that starts an agent with ``python`` through ``become``.

    Args:
        become: a configured become plugin instance (sudo, su, doas, any).
        shell: the connection's shell plugin, with ``executable`` set
            (``connection._shell``): the plugin wraps the command with it.
        python: the interpreter of the new agent on the target.
        timeout: seconds the agent may take to answer (prompt included).
    The plugin's state (id, success marker, prompt) is left as it was.

    Returns:
        A dict of builtin values: ``command``, ``python``, ``password``,
        ``prompt``, ``success``, ``incorrect``, ``missing``, ``name``,
        ``timeout`` and ``key``. ``key`` identifies the agent for reuse
        across tasks: the command with the plugin's random per-command id
        masked, and a digest of the password (never the password itself).
    """
    # build_become_command() sets the plugin's id, success marker and
    # prompt: put them back, so a command the task wrapped before (whose
    # success line is yet to be stripped) keeps its own.
    saved = {a: getattr(become, a) for a in _STATE if hasattr(become, a)}
    try:
        command = become.build_become_command(bootstrap.agent_command(python), shell)
        prompt = prompt_regex(become)
        success = to_text(become.success) if become.success else None
        become_id = to_text(getattr(become, "_id", "") or "")
    finally:
        for attr, value in saved.items():
            setattr(become, attr, value)
    if not command:
        raise ValueError("become plugin %s built no command" % become.name)
    password = _option(become, "become_pass")
    password = to_text(password) if password else None
    name = to_text(become.name)
    stable = command.replace(become_id, _ID_MASK) if become_id else command
    key = {"command": stable, "python": python, "name": name,
           "password": hashlib.sha256(password.encode("utf-8")).hexdigest() if password else None}
    return {
        "command": command,
        "python": python,
        "password": password,
        "prompt": prompt,
        "success": success,
        "incorrect": _texts(become, become.fail),
        "missing": _texts(become, become.missing),
        "name": name,
        "timeout": float(timeout),
        "key": key,
    }
