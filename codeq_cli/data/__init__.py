"""Image folders, transforms, the data order (sampling) and the bundled Fashion-MNIST demo data."""
