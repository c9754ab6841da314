{
  description = "DevOS: the DevOS agent as a NixOS module and package, and DevOS NixOS images";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      # The DevOS image with the defaults of nixos/image.nix; devos-build renders a
      # spec into one more module (docs/nixos.md).
      image =
        modules:
        nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [ ./nixos/image.nix ] ++ modules;
        };
      devos = image [ ];
      variants = import ./nixos/variants.nix { inherit pkgs; };
    in
    {
      packages.${system} = {
        devos-agent = pkgs.callPackage ./nixos/package.nix { };
        default = self.packages.${system}.devos-agent;
      } // nixpkgs.lib.mapAttrs' (name: build: {
        name = "image-${name}";
        value = build devos.config;
      }) variants;

      nixosModules = {
        devos-agent = ./nixos/module.nix;
        image = ./nixos/image.nix;
        default = self.nixosModules.devos-agent;
      };

      nixosConfigurations.devos = devos;

      # For devos-build and for configurations of your own: the image of these modules.
      lib = { inherit image variants; };

      checks.${system} = {
        agent = pkgs.testers.runNixOSTest ./nixos/tests/agent.nix;
        devos-agent = self.packages.${system}.devos-agent;
      };
    };
}
