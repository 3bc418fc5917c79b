"""One module per upstream API (its config model, adapter and wire format);
nothing outside them knows a wire format. :mod:`.registry` lists them."""
