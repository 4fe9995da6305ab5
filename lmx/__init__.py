"""Generated protocol buffer stubs (`make proto`). Never hand-edited."""
