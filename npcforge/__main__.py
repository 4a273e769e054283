from npcforge.cli import main

main()
