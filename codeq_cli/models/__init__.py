"""Finding, building and loading timm/torchvision classifiers, and the data config they expect."""
