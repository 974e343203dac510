from label_studio_sam2.cli.main import main

if __name__ == "__main__":
    main()
