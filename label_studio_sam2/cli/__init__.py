"""`label-studio-sam2 <command>`: every subcommand's parser and entry point."""
