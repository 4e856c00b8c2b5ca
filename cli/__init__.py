"""The `skillpay` command (cli.commands:main)."""
