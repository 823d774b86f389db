"""The REST job service (`specmill serve`): submit, watch and cancel factory jobs, which run on Ray."""
