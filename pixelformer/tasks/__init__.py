"""Task plug-ins. Every module in this package is imported, which registers the tasks it defines."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
