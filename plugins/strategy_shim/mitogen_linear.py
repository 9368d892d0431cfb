# Shim: lets `strategy: mitogen_linear` resolve through `strategy_plugins = <this dir>`.
from ansible_collections.mitogen.svc.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
