"""One small module per DVC stage; each wires the lower layers together and holds no model logic."""
