# Shim: lets `strategy: mitogen_host_pinned` resolve through `strategy_plugins = <this dir>`.
from ansible_collections.mitogen.svc.plugins.strategy.mitogen_host_pinned import StrategyModule  # noqa: F401
