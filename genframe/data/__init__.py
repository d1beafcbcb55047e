"""Data modules shipped with genframe (registered through `genframe.data.builtin`)."""
