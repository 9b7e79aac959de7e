"""Pictures of trained models (layer 5): attention maps of a classifier, a detector's boxes."""
