__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from das_lightning import attribute`` without importing torch, Lightning and Hydra with the package
    if name == "attribute":
        from das_lightning.api import attribute

        return attribute
    raise AttributeError(f"module 'das_lightning' has no attribute {name!r}")
