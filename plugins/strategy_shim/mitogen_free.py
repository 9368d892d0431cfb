# Shim: lets `strategy: mitogen_free` resolve through `strategy_plugins = <this dir>`.
from ansible_collections.mitogen.svc.plugins.strategy.mitogen_free import StrategyModule  # noqa: F401
