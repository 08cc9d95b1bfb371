"""Who may connect: tokens (static, JWT, Phoenix.Token), bans, browser origins."""
