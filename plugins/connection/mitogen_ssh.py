# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see LICENSE)
from __future__ import annotations

DOCUMENTATION = """
    name: mitogen_ssh
    short_description: OpenSSH with one persistent mitogen.svc agent per host and user
    description:
        - Connects with the OpenSSH client, like the builtin C(ssh) plugin, but
          starts one Python agent per (host, user, options) and keeps it for the
          whole ansible-playbook run. Commands, file transfers and fetches are
          calls to that agent.
        - The mitogen.svc strategies swap it in for C(ssh) and C(smart)
          automatically. It can also be selected by name.
        - Honours the same options as the builtin C(ssh) plugin listed here.
          C(ControlMaster), C(ControlPersist) and C(ControlPath) are dropped
          from O(ssh_args) because the agent is the persistent connection.
    version_added: 0.1.0
    author: mitogen.svc developers
    extends_documentation_fragment:
      - mitogen.svc.agent_connection
    options:
      host:
        description: Hostname or address to connect to.
        type: string
        default: inventory_hostname
        vars:
          - name: inventory_hostname
          - name: ansible_host
          - name: ansible_ssh_host
          - name: delegated_vars['ansible_host']
          - name: delegated_vars['ansible_ssh_host']
        version_added: 0.1.0
      host_key_checking:
        description: When false, C(-o StrictHostKeyChecking=no) is passed to ssh.
        type: boolean
        default: true
        ini:
          - section: defaults
            key: host_key_checking
          - section: ssh_connection
            key: host_key_checking
        env:
          - name: ANSIBLE_HOST_KEY_CHECKING
          - name: ANSIBLE_SSH_HOST_KEY_CHECKING
        vars:
          - name: ansible_host_key_checking
          - name: ansible_ssh_host_key_checking
        version_added: 0.1.0
      password:
        description: Password for the login; answered on a pty when ssh prompts.
        type: string
        vars:
          - name: ansible_password
          - name: ansible_ssh_pass
          - name: ansible_ssh_password
        version_added: 0.1.0
      password_mechanism:
        description:
          - How a wrong O(password) is reported, as with the stock plugin.
            The password is always typed on a pty when ssh prompts; no
            C(sshpass) or askpass program is needed.
          - V(ssh_askpass) (the default on ansible-core 2.19 and later) lets
            ssh prompt once (C(NumberOfPasswordPrompts=1)) and reports ssh's
            own error (C(Permission denied)).
          - V(sshpass) (the default before 2.19) fails with
            C(Invalid/incorrect password) when ssh prompts again.
          - V(disable) gives ssh no password.
        type: string
        choices: [ssh_askpass, sshpass, disable]
        env:
          - name: ANSIBLE_SSH_PASSWORD_MECHANISM
        ini:
          - section: ssh_connection
            key: password_mechanism
        vars:
          - name: ansible_ssh_password_mechanism
        version_added: 0.1.0
      sshpass_prompt:
        description:
          - Text of the prompt that gets O(password), as with the stock plugin.
            Only a prompt whose line contains it is answered with the
            password; ssh's other password prompts get an empty answer, as
            from Ansible's askpass helper, so the login fails the way
            vanilla's does.
          - Empty (the default) answers any prompt ending in C(password:) or
            C(passphrase:).
        type: string
        default: ''
        ini:
          - section: ssh_connection
            key: sshpass_prompt
        env:
          - name: ANSIBLE_SSHPASS_PROMPT
        vars:
          - name: ansible_sshpass_prompt
        version_added: 0.1.0
      pkcs11_provider:
        description:
          - PKCS#11 library of a smart card holding the login key (for example
            C(/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so)), as with the stock
            plugin. O(password) is the card's PIN, typed when ssh asks for it
            (C(Enter PIN for ...), or the prompt in O(sshpass_prompt)); a PIN is
            required. ssh then logs in by public key only.
        type: string
        default: ''
        ini:
          - section: ssh_connection
            key: pkcs11_provider
        env:
          - name: ANSIBLE_PKCS11_PROVIDER
        vars:
          - name: ansible_ssh_pkcs11_provider
        version_added: 0.1.0
      verbosity:
        description:
          - Verbosity of the ssh client (C(-v) given this many times), as with
            the stock plugin of ansible-core 2.19 and later. What ssh says
            while it logs in is part of the error when the login fails;
            later lines go to the mux's log (C(MITOGEN_SVC_MUX_LOG_LEVEL=DEBUG)).
        type: int
        default: 0
        ini:
          - section: ssh_connection
            key: verbosity
        env:
          - name: ANSIBLE_SSH_VERBOSITY
        vars:
          - name: ansible_ssh_verbosity
        version_added: 0.1.0
      ssh_args:
        description: Arguments given to every ssh invocation.
        type: string
        default: -C -o ControlMaster=auto -o ControlPersist=60s
        ini:
          - section: ssh_connection
            key: ssh_args
        env:
          - name: ANSIBLE_SSH_ARGS
        vars:
          - name: ansible_ssh_args
        version_added: 0.1.0
      ssh_common_args:
        description: Extra arguments for ssh, sftp and scp (only ssh is run here).
        type: string
        default: ''
        ini:
          - section: ssh_connection
            key: ssh_common_args
        env:
          - name: ANSIBLE_SSH_COMMON_ARGS
        vars:
          - name: ansible_ssh_common_args
        cli:
          - name: ssh_common_args
        version_added: 0.1.0
      ssh_extra_args:
        description: Extra arguments for ssh only.
        type: string
        default: ''
        ini:
          - section: ssh_connection
            key: ssh_extra_args
        env:
          - name: ANSIBLE_SSH_EXTRA_ARGS
        vars:
          - name: ansible_ssh_extra_args
        cli:
          - name: ssh_extra_args
        version_added: 0.1.0
      ssh_executable:
        description: The ssh client to run.
        type: string
        default: ssh
        ini:
          - section: ssh_connection
            key: ssh_executable
        env:
          - name: ANSIBLE_SSH_EXECUTABLE
        vars:
          - name: ansible_ssh_executable
        version_added: 0.1.0
      port:
        description: Remote port; ssh's own default (or ssh_config) when unset.
        type: int
        ini:
          - section: defaults
            key: remote_port
        env:
          - name: ANSIBLE_REMOTE_PORT
        vars:
          - name: ansible_port
          - name: ansible_ssh_port
        keyword:
          - name: port
        version_added: 0.1.0
      remote_user:
        description: Login user; ssh's own default (or ssh_config) when unset.
        type: string
        ini:
          - section: defaults
            key: remote_user
        env:
          - name: ANSIBLE_REMOTE_USER
        vars:
          - name: ansible_user
          - name: ansible_ssh_user
        cli:
          - name: user
        keyword:
          - name: remote_user
        version_added: 0.1.0
      pipelining:
        description: Send modules on stdin instead of copying them first, as for C(ssh).
        type: boolean
        default: false
        ini:
          - section: defaults
            key: pipelining
          - section: connection
            key: pipelining
          - section: ssh_connection
            key: pipelining
        env:
          - name: ANSIBLE_PIPELINING
          - name: ANSIBLE_SSH_PIPELINING
        vars:
          - name: ansible_pipelining
          - name: ansible_ssh_pipelining
        version_added: 0.1.0
      private_key_file:
        description: Private key for the login, passed as C(-o IdentityFile=...).
        type: string
        ini:
          - section: defaults
            key: private_key_file
        env:
          - name: ANSIBLE_PRIVATE_KEY_FILE
        vars:
          - name: ansible_private_key_file
          - name: ansible_ssh_private_key_file
        cli:
          - name: private_key_file
            option: '--private-key'
        version_added: 0.1.0
      private_key:
        description:
          - Private key contents in PEM format (ansible-core 2.19 and later;
            ignored before). As with the stock plugin, the key is added to
            the ssh-agent Ansible uses (C(SSH_AGENT)) and ssh is told to use
            only it; it wins over O(private_key_file).
        type: string
        env:
          - name: ANSIBLE_PRIVATE_KEY
        vars:
          - name: ansible_private_key
          - name: ansible_ssh_private_key
        version_added: 0.1.0
      private_key_passphrase:
        description: Passphrase of O(private_key).
        type: string
        env:
          - name: ANSIBLE_PRIVATE_KEY_PASSPHRASE
        vars:
          - name: ansible_private_key_passphrase
          - name: ansible_ssh_private_key_passphrase
        version_added: 0.1.0
      reconnection_retries:
        description:
          - How many more times to try a login that ssh itself failed (its
            status 255), as the stock plugin does, pausing 0, 1, 3, 7...
            (at most 30) seconds in between. Commands then run through the
            agent, so there is nothing else to retry.
        type: integer
        default: 0
        env:
          - name: ANSIBLE_SSH_RETRIES
        ini:
          - section: connection
            key: retries
          - section: ssh_connection
            key: retries
        vars:
          - name: ansible_ssh_retries
        version_added: 0.1.0
      timeout:
        description: Seconds to wait for the connection (ssh C(ConnectTimeout)).
        type: integer
        default: 10
        ini:
          - section: defaults
            key: timeout
          - section: ssh_connection
            key: timeout
        env:
          - name: ANSIBLE_TIMEOUT
          - name: ANSIBLE_SSH_TIMEOUT
        vars:
          - name: ansible_ssh_timeout
        cli:
          - name: timeout
        version_added: 0.1.0
      use_tty:
        description: Run commands that may escalate privileges on a pty, like C(ssh -tt).
        type: boolean
        default: true
        ini:
          - section: ssh_connection
            key: usetty
        env:
          - name: ANSIBLE_SSH_USETTY
        vars:
          - name: ansible_ssh_use_tty
        version_added: 0.1.0
      agent_python:
        description:
          - Interpreter that runs the agent on the target. Defaults to
            C(ansible_python_interpreter) when that is a plain path, else C(python3).
        type: string
        vars:
          - name: ansible_mitogen_ssh_agent_python
          - name: ansible_python_interpreter
        env:
          - name: ANSIBLE_MITOGEN_SSH_AGENT_PYTHON
        version_added: 0.1.0
"""

import os
import subprocess
import time
import typing as t

from ansible.errors import AnsibleAuthenticationFailure, AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_text

from ansible_collections.mitogen.svc.plugins.plugin_utils import _bytecode  # noqa: F401  (first: caches bytecode)
from ansible_collections.mitogen.svc.plugins.plugin_utils._async import CORE
from ansible_collections.mitogen.svc.plugins.plugin_utils._connection import (AgentConnection,
                                                                              display)

# Options whose effect the persistent agent replaces; kept out of ssh's argv.
_DROPPED_SSH_OPTIONS = ("controlmaster", "controlpersist", "controlpath")
#: What ssh asks a smart card's PIN with (the stock plugin's default prompt
#: when pkcs11_provider is set).
_PKCS11_PROMPT = "Enter PIN for "
#: ssh's log levels at which it says so when a session with a tty ends.
_SSH_CHATTY_LEVELS = ("INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")


def _without_control_options(args: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o" and i + 1 < len(args):
            value, step = args[i + 1], 2
        elif arg.startswith("-o") and len(arg) > 2:
            value, step = arg[2:], 1
        else:
            out.append(arg)
            i += 1
            continue
        if value.split("=", 1)[0].strip().lower() not in _DROPPED_SSH_OPTIONS:
            out += ["-o", value]
        i += step
    return out


def agent_python(value: t.Any) -> str:
    text = to_text(value or "").strip()
    if not text or text.startswith("auto") or " " in text:
        return "python3"
    return text


class Connection(AgentConnection):
    """ssh through a persistent mitogen.svc agent."""

    transport = "mitogen.svc.mitogen_ssh"
    _transport_word = "ssh"

    def _describe_host(self) -> str:
        return to_text(self.get_option("host") or self._play_context.remote_addr)

    def _ssh_options(self, password: str | None) -> list[str]:
        args: list[str] = []
        card = self._pkcs11_provider()
        if card and password:  # first, as vanilla: ssh takes an option's first value
            args += ["-o", "KbdInteractiveAuthentication=no",
                     "-o", "PreferredAuthentications=publickey",
                     "-o", "PasswordAuthentication=no", "-o", "PKCS11Provider=%s" % card]
        verbosity = int(self.get_option("verbosity") or 0)
        if verbosity > 0:
            args.append("-" + "v" * verbosity)
        args += _without_control_options(self._split_ssh_args(self.get_option("ssh_args") or ""))
        if not self.get_option("host_key_checking"):
            args += ["-o", "StrictHostKeyChecking=no"]
        port = self.get_option("port")
        if port:
            args += ["-o", "Port=%d" % int(port)]
        in_agent = self._agent_identity()
        key = self.get_option("private_key_file")
        if in_agent:
            args += ["-o", "IdentitiesOnly=yes", "-o", 'IdentityFile="%s"' % in_agent]
        elif key:
            args += ["-o", 'IdentityFile="%s"' % os.path.expanduser(to_text(key))]
        if not password:
            args += ["-o", "KbdInteractiveAuthentication=no",
                     "-o", "PreferredAuthentications=gssapi-with-mic,gssapi-keyex,hostbased,publickey",
                     "-o", "PasswordAuthentication=no"]
        user = self.get_option("remote_user")
        if user:
            args += ["-o", 'User="%s"' % to_text(user)]
        args += ["-o", "ConnectTimeout=%d" % int(self.get_option("timeout"))]
        for name in ("ssh_common_args", "ssh_extra_args"):
            args += self._split_ssh_args(self.get_option(name) or "")
        return args

    def _agent_identity(self) -> str | None:
        """With ``private_key``: the stock plugin adds it to Ansible's
        ssh-agent (its ``_populate_agent``, ansible-core 2.19+) and gives the
        public key's file, which ssh then uses as its only identity."""
        if not self.get_option("private_key"):
            return None
        cached = getattr(self, "_agent_pubkey", None)
        if cached is None:
            populate = getattr(self._vanilla_connection(), "_populate_agent", None)
            if populate is None:  # ansible-core 2.18: no such option
                return None
            try:
                cached = self._agent_pubkey = str(populate())
            except Exception as exc:
                raise AnsibleAuthenticationFailure(
                    "Failed to add configured private key into ssh-agent.") from exc
        return t.cast(str, cached)

    def _password(self) -> str | None:
        password = self.get_option("password")
        if not password or self._password_mechanism() == "disable":
            return None
        return to_text(password)

    def _password_mechanism(self) -> str:
        # The stock plugin's default: ssh_askpass from ansible-core 2.19,
        # sshpass before (which had no such option).
        return to_text(self.get_option("password_mechanism")
                       or ("sshpass" if CORE < (2, 19) else "ssh_askpass"))

    def _pkcs11_provider(self) -> str:
        return to_text(self.get_option("pkcs11_provider") or "")

    def _password_prompt(self) -> str | None:
        """The text of the prompt that gets the password (None: any
        password prompt); a smart card's PIN prompt by default."""
        prompt = to_text(self.get_option("sshpass_prompt") or "")
        if not prompt and self._pkcs11_provider():
            prompt = _PKCS11_PROMPT
        return prompt or None

    def _route_spec(self) -> dict[str, t.Any]:
        password = self._password()
        if self._pkcs11_provider() and password is None:
            raise AnsibleError("to use pkcs11_provider you must specify a password/pin")
        return {
            "kind": "ssh",
            "host": self._describe_host(),
            "ssh_path": to_text(self.get_option("ssh_executable") or "ssh"),
            "ssh_args": self._ssh_options(password),
            "python": agent_python(self.get_option("agent_python")),
            "password": password,
            "single_prompt": password is not None and self._password_mechanism() != "sshpass",
            "prompt": self._password_prompt() if password is not None else None,
            "timeout": int(self.get_option("timeout")),
        }

    def _connect(self) -> "Connection":
        if not self._connected:
            display.vvv("ESTABLISH MITOGEN_SSH CONNECTION FOR USER: %s"
                        % self.get_option("remote_user"), host=self._describe_host())
        # A failure is_pipelining_enabled() saw was already retried: the base
        # class raises it again.
        retries = (0 if self._deferred_failure is not None
                   else int(self.get_option("reconnection_retries") or 0))
        for attempt in range(retries + 1):
            try:
                super()._connect()
                return self
            except AnsibleConnectionFailure as exc:
                if attempt == retries or getattr(exc, "msvc_ssh_stderr", None) is None:
                    raise
                pause = min(2 ** attempt - 1, 30)
                display.vv("ssh_retry: attempt: %d, ssh return code is 255. cmd (%s...), "
                           "pausing for %d seconds" % (attempt + 1, self.get_option("ssh_executable")
                                                       or "ssh", pause), host=self._describe_host())
                time.sleep(pause)
        return self

    def _vanilla_connection(self) -> t.Any:
        from ansible_collections.mitogen.svc.plugins.plugin_utils._strategy import (
            stock_connection)
        conn = stock_connection("ansible.builtin.ssh", self._play_context)
        conn.set_options(var_options=self._var_options)
        conn.set_become_plugin(self.become)
        return conn

    def _shell_argv(self, cmd: str) -> list[str]:
        # sshd hands the command to the login shell: so do we.
        return [self._login_shell(), "-c", cmd]

    def _login_shell(self) -> str:
        shell = getattr(self, "_shell_path", None)
        if shell is None:
            shell = self._shell_path = to_text(self._target("login_shell"))
        return shell

    def _use_pty(self, in_data: bytes | None, sudoable: bool) -> bool:
        return not in_data and sudoable and bool(self.get_option("use_tty"))

    def _tty_closed_message(self) -> bytes:
        """The line vanilla's ``ssh -tt`` prints on its stderr when the
        command ends: "Shared connection to HOST closed." through a
        ControlPersist master, "Connection to HOST closed." without one,
        nothing below LogLevel INFO (``-q``, ``-o LogLevel=ERROR``)."""
        conf = self._ssh_settings()
        if conf.get("loglevel", "INFO").upper() not in _SSH_CHATTY_LEVELS:
            return b""
        host = conf.get("hostname") or self._describe_host()
        shared = (conf.get("controlmaster", "false").lower() not in ("false", "no")
                  and conf.get("controlpersist", "no").lower() not in ("false", "no"))
        if shared:
            return ("Shared connection to %s closed.\r\n" % host).encode()
        return ("Connection to %.64s closed.\r\n" % host).encode()

    def _ssh_settings(self) -> dict[str, str]:
        """The settings vanilla's ssh command line would end up with for this
        host, ssh's config files included (``ssh -G``, lower-case keys);
        from the arguments alone when ssh cannot say."""
        cached = getattr(self, "_ssh_g", None)
        if cached is not None:
            return t.cast("dict[str, str]", cached)
        args = (self._split_ssh_args(self.get_option("ssh_args") or "")
                + self._ssh_options(self._password()))
        conf: dict[str, str] = {}
        try:
            out = subprocess.run([to_text(self.get_option("ssh_executable") or "ssh"), "-G"]
                                 + args + [self._describe_host()], stdin=subprocess.DEVNULL,
                                 capture_output=True, timeout=10, check=True).stdout
            for line in to_text(out, errors="surrogate_or_replace").splitlines():
                key, _, value = line.partition(" ")
                conf[key.lower()] = value.strip()
        except (OSError, subprocess.SubprocessError):
            for i, arg in enumerate(args):
                if arg == "-q":
                    conf["loglevel"] = "QUIET"
                option = (args[i + 1] if arg == "-o" and i + 1 < len(args)
                          else arg[2:] if arg.startswith("-o") else "")
                key, _, value = option.replace(" ", "=", 1).partition("=")
                if key and value:
                    conf.setdefault(key.strip().lower(), value.strip())
        self._ssh_g = conf
        return conf
