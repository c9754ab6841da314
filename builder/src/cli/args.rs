//! The command line, as clap definitions: every command, flag and its help text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::boottest::TestOptions;
use crate::boottest::vm::DiskBus;
use crate::model::spec::DEFAULT_SPEC;

/// Build, boot-test and publish immutable DevOS images from declarative specs.
#[derive(Parser)]
#[command(name = "devos-build", version, about)]
pub struct Cli {
    /// Debug logging (also: DEVOS_LOG=debug). Without it, a terminal shows warnings
    /// only (a spinner says what runs); stderr that is no terminal (CI, a pipe, a
    /// file) or NO_COLOR also gets every external command line.
    #[arg(short, long, global = true)]
    pub(crate) verbose: bool,
    /// The image registry (SQLite). Default: ~/.local/share/devos/registry.db (also
    /// when empty, as `DEVOS_REGISTRY=` leaves it).
    #[arg(
        long,
        global = true,
        env = "DEVOS_REGISTRY",
        value_name = "FILE",
        // Takes an empty value (PathBuf's own parser refuses it); `cli::run` reads it as
        // the default.
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub(crate) registry: Option<PathBuf>,
    /// The builder's settings file (AWS endpoint, SSM prefix, ...). Default:
    /// ~/.config/devos/config.toml (also when empty, as `DEVOS_CONFIG=` leaves it).
    #[arg(
        long,
        global = true,
        env = "DEVOS_CONFIG",
        value_name = "FILE",
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Build, test and inspect images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Inspect and prune the build cache (stage outputs, packages, package lists).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Publish tested versions as AMIs (or through Packer) and update feeds, and manage
    /// what was published.
    #[command(subcommand)]
    Publish(PublishCommand),
    /// Render Packer templates.
    #[command(subcommand)]
    Packer(PackerCommand),
    /// Fleets of instances running an image (CloudFormation).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// The builder's keys: the one that signs update bundles and feeds (images with `[update]` trust it) and the Secure Boot key (images with `[disk] secure-boot` start only what it signed).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check the host tools the builder needs and say how to install missing ones.
    Doctor {
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash: `devos-build completions bash >
    /// /etc/bash_completion.d/devos-build`; zsh, fish, elvish, powershell alike).
    Completions {
        /// The shell to write the script for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page of devos-build or of one of its commands, in roff (`devos-build
    /// man image build | man -l -`).
    Man {
        /// The command, e.g. `image build`; none for devos-build itself.
        command: Vec<String>,
    },
    /// Join stdin and stdout to a TCP address (internal: QEMU runs this for each
    /// guest connection to the stand-in instance metadata of a boot test).
    #[command(hide = true)]
    Relay { addr: String },
}

#[derive(Subcommand)]
pub(crate) enum ImageCommand {
    /// Build an image from a spec: rootfs, customize, disk, convert.
    Build(BuildArgs),
    /// Check a spec offline and at once: its keys and their types, layers, users,
    /// sizes, formats, and a package set that can boot. `plan` and `build` check the
    /// same first (not the builder's signing keys: `build --dry-run` checks those).
    Validate {
        /// The image spec.
        #[arg(default_value = DEFAULT_SPEC)]
        spec: PathBuf,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Print the build id and every input that went into it, without building.
    Plan {
        /// The image spec.
        #[arg(default_value = DEFAULT_SPEC)]
        spec: PathBuf,
        /// Use this prebuilt agent package instead of building devos-agent from source.
        #[arg(long, value_name = "DEB")]
        agent_deb: Option<PathBuf>,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// List the images and versions in the registry, newest first.
    List {
        /// Only this image.
        name: Option<String>,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Show one version: its verified root hash, update feed and key, Secure Boot
    /// certificate, artifacts, stage timings, boot-test runs.
    Show {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Compare two versions: packages added, removed and changed, files, sizes.
    Diff {
        /// The older version: NAME (its newest version), NAME@VERSION, or NAME@ a unique
        /// prefix of a version or build id.
        #[arg(value_parser = reference)]
        from: String,
        /// The newer version, written as FROM is.
        #[arg(value_parser = reference)]
        to: String,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Recompute the sha256 of a version's artifacts and compare with the registry.
    Verify {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Delete old versions' artifacts and the cache entries only they used. The
    /// newest version that passed a boot test is always kept, and so is what a stack
    /// runs or would go back to.
    Gc {
        /// Versions to keep per image, newest first.
        #[arg(long, default_value_t = 3, allow_hyphen_values = true, value_parser = count)]
        keep: usize,
        /// Only this image.
        name: Option<String>,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Boot an image under QEMU and check that it comes up and its agent answers.
    Test {
        /// An image file, an output directory, a spec (its newest build), or
        /// NAME[@VERSION] from the registry.
        #[arg(default_value = DEFAULT_SPEC, value_parser = target)]
        target: PathBuf,
        #[command(flatten)]
        vm: VmArgs,
        /// Test the update path instead: boot the target, let it update itself to this
        /// version (NAME@VERSION, built with `[update]`) from a feed served on this
        /// host, and test the boot after (the newer version must run, and its counted
        /// boot be blessed); then `devos update --rollback` in it, and the boot after
        /// that (the target's version again). Not recorded as either version's boot test.
        #[arg(long, value_name = "NAME@VERSION", value_parser = reference)]
        update_to: Option<String>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Convert a version's raw image to another format (vmdk: streamOptimized, vhd:
    /// fixed, whole MiB; qcow2) and record it with its sha256.
    Export {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// The format to convert to.
        #[arg(long, value_parser = ["qcow2", "vmdk", "vhd"])]
        format: String,
        /// Write here instead of next to the raw image (not recorded in the registry).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Boot an image interactively with the serial console on this terminal.
    Boot {
        /// An image file, an output directory, a spec (its newest build), or
        /// NAME[@VERSION] from the registry.
        #[arg(default_value = DEFAULT_SPEC, value_parser = target)]
        target: PathBuf,
        /// Forward this host port (on 127.0.0.1) to the guest's SSH port, with your
        /// public key handed in as an EC2 instance's key pair is (instance metadata):
        /// `ssh -p PORT dev@127.0.0.1` then logs in as on an instance.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        ssh_port: Option<u16>,
        /// The public key to hand in with --ssh-port (default: your first
        /// ~/.ssh/id_{ed25519,ecdsa,rsa}.pub; under sudo, the sudo user's).
        #[arg(long, value_name = "FILE.pub", requires = "ssh_port")]
        ssh_key: Option<PathBuf>,
        /// Log this user in on the console (default: the image's first user, or root
        /// when it has none). Only a local boot can: clouds always ask for a login.
        #[arg(long, value_name = "USER", conflicts_with = "no_autologin")]
        autologin: Option<String>,
        /// A login prompt on the console instead of the autologin.
        #[arg(long)]
        no_autologin: bool,
        #[command(flatten)]
        machine: MachineArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Make whichever of the builder's two keys is missing: the update signing key
    /// (OpenPGP Ed25519, kept by GnuPG) and the Secure Boot key (RSA-2048 and its
    /// self-signed certificate, `[disk] secure-boot`), in ~/.local/share/devos/keys or
    /// DEVOS_KEYS. Refused when both exist.
    Generate {
        /// Also write the public key here, for a spec's `[update] key`.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Print the signing key's fingerprint, the Secure Boot certificate (subject,
    /// SHA-256, expiry; checked to be the key's) and where they are kept
    /// (~/.local/share/devos/keys, or DEVOS_KEYS).
    Show {
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Write the update signing key's public key (OpenPGP, binary, as images carry it)
    /// to FILE, for a spec's `[update] key`. (The Secure Boot certificate is
    /// secure-boot.crt in the key directory.)
    Export {
        /// Where to write the public key (an existing file is replaced only if it
        /// holds this same key).
        file: PathBuf,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum PublishCommand {
    /// Add a tested version's update bundle to an update feed (a directory or an S3
    /// prefix, served over HTTP(S) at the spec's `[update] url`) and sign the feed's
    /// SHA256SUMS.
    Updates {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// The feed: a directory (made if missing) or s3://BUCKET/PREFIX; other
        /// versions in it are kept.
        #[arg(long, value_parser = feed)]
        to: String,
        /// Publish even without a passing boot test, or when machines of a version
        /// signed for Secure Boot could not start this one.
        #[arg(long)]
        force: bool,
        /// The bucket's region (s3:// only). Default: `[aws] region`, else AWS_REGION /
        /// the profile's.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        #[command(flatten)]
        aws: AwsArgs,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Upload a tested version to an EBS snapshot (EBS direct APIs), register it as an
    /// AMI (a Secure Boot image's with its keys as UEFI data, made by uefivars), copy it
    /// to more regions, and write its SSM parameters. Idempotent.
    Ami {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// The region to upload to. Default: `[aws] region`, else AWS_REGION / the profile's.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        /// Copy the AMI to these regions too (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = region_name)]
        copy_to: Vec<String>,
        /// The AMI name. Default: NAME-VERSION with `+` as `-`.
        #[arg(long, value_parser = ami_name)]
        name: Option<String>,
        /// Publish even without a passing boot test (loudly; the AMI is tagged so).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Point PREFIX/NAME/latest at this version's AMI in every region it is in.
    Promote {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Only these regions (comma-separated). Default: all it is published in.
        #[arg(long, value_delimiter = ',', value_parser = region_name)]
        region: Vec<String>,
        #[command(flatten)]
        aws: AwsArgs,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Everything published, newest first.
    List {
        /// Only this image.
        name: Option<String>,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Build an AMI with Packer from the latest official Ubuntu base AMI, installing
    /// this version's agent package and config; records the AMI it made.
    Packer {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Default: `[aws] region`, else AWS_REGION.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        /// Render the variant without a communicator (nothing is provisioned): for
        /// endpoints without real instances, such as test servers.
        #[arg(long)]
        no_communicator: bool,
        /// Passed to `packer build -var` (e.g. base_ami_name=..., instance_type=...).
        #[arg(long = "var", value_name = "NAME=VALUE", value_parser = packer_var)]
        vars: Vec<String>,
        /// Publish even without a passing boot test.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Deregister a version's AMIs in every region and delete their snapshots and
    /// SSM parameters.
    Deregister {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Even if PREFIX/NAME/latest points at it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Read the uploaded snapshot back (EBS direct APIs) and compare it with the raw
    /// image, block by block.
    Verify {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Default: `[aws] region`, else AWS_REGION.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        #[command(flatten)]
        aws: AwsArgs,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum FleetCommand {
    /// Render a CloudFormation template for a tested version (published in the region,
    /// except for WorkSpaces).
    Render {
        /// The kind of stack: one instance, a fleet (Auto Scaling group) or WorkSpaces.
        #[arg(value_enum)]
        template: crate::fleet::Template,
        /// NAME@VERSION (or NAME: its newest version).
        #[arg(long, value_parser = reference)]
        image: String,
        /// Default: `[aws] region`, else AWS_REGION (`workspaces` needs none).
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        /// Write here instead of to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Create a stack from a template for a tested, published version, or update the
    /// stack to it. Network parameters default to the default VPC and its subnets.
    Deploy {
        #[command(flatten)]
        stack: StackArgs,
        /// The kind of stack: one instance or a fleet (Auto Scaling group). A WorkSpaces
        /// stack needs a bundle made by hand first: `fleet render workspaces`, then
        /// `aws cloudformation deploy` (docs/fleet.md).
        #[arg(long, value_enum)]
        template: crate::fleet::Template,
        /// NAME@VERSION (or NAME: its newest version).
        #[arg(long, value_parser = reference)]
        image: String,
        /// A template parameter (InstanceType=t3.large, DesiredCapacity=4, KeyName=...).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<String>,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Roll a stack to a version, health-gated: by replacement (canary stack first), or
    /// in place through the instances' agents (--in-place); a failure rolls back and
    /// marks the version bad for the stack.
    Rollout {
        #[command(flatten)]
        stack: StackArgs,
        /// VERSION (of the stack's image) or NAME@VERSION.
        #[arg(long, value_parser = reference)]
        to: String,
        /// Roll this stack first; the main stack only if it passes its gate.
        #[arg(long, value_name = "STACK", conflicts_with = "in_place", value_parser = stack_name)]
        canary_stack: Option<String>,
        /// Update the running instances through their agents (A/B root slots, one
        /// reboot each) instead of replacing them; images built with `[update]`.
        #[arg(long)]
        in_place: bool,
        /// In place: instances per batch.
        #[arg(long, default_value_t = 1, requires = "in_place", value_parser = at_least_one::<usize>)]
        batch: usize,
        /// In place: seconds a batch may take to report the version healthy.
        #[arg(
            long,
            default_value_t = 1800,
            value_name = "SECONDS",
            requires = "in_place",
            value_parser = at_least_one::<u64>
        )]
        batch_timeout: u64,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Roll a stack back: to VERSION, or to the last version that passed its gate there.
    Rollback {
        #[command(flatten)]
        stack: StackArgs,
        /// The version to go back to: VERSION (of the stack's image; a prefix of one
        /// is enough) or NAME@VERSION. Default: the last version that passed its gate
        /// on the stack and is not marked bad there.
        #[arg(long, value_parser = reference)]
        to: Option<String>,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Take back a version's mark as bad for a stack (after a failure that was not the
    /// version's: capacity, permissions, a parameter), so it may go there again.
    Unmark {
        #[command(flatten)]
        stack: StackArgs,
        /// NAME@VERSION (a prefix of one of NAME's versions or build ids is enough).
        #[arg(value_parser = reference)]
        reference: String,
        /// Say what mark would be taken back, and take back nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// What a stack runs: its version, launch template, instances and last rollout.
    Status {
        #[command(flatten)]
        stack: StackArgs,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Every deploy, rollout and rollback the registry recorded, newest first.
    History {
        /// Only this stack.
        #[arg(long, value_parser = stack_name)]
        stack: Option<String>,
        /// Only this region.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct StackArgs {
    /// The CloudFormation stack.
    #[arg(long = "stack", value_name = "STACK", value_parser = stack_name)]
    pub(super) name: String,
    /// Default: `[aws] region`, else AWS_REGION / the profile's.
    #[arg(long, value_parser = region_name)]
    pub(super) region: Option<String>,
    #[command(flatten)]
    pub(super) aws: AwsArgs,
}

#[derive(Args)]
pub(crate) struct ChangeArgs {
    /// Show the change set (what would be replaced) and change nothing (exit code 3:
    /// nothing to do).
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Seconds the health gate watches the new version after the stack update.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub(super) bake: u64,
    /// Print the result as JSON on stdout (docs/cli.md gives its shape).
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum PackerCommand {
    /// Write the HCL2 template and what it installs for a version into a directory,
    /// laid out by `packer fmt` and checked with `packer validate`.
    Render {
        /// The version: NAME (its newest version), NAME@VERSION, or NAME@PREFIX (a prefix
        /// of exactly one of its versions or build ids).
        #[arg(value_parser = reference)]
        reference: String,
        /// Default: `packer/` in the version's output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The region the template builds in (written into it as the `region`
        /// variable's default). Default: `[aws] region`, else AWS_REGION /
        /// AWS_DEFAULT_REGION; one of them is needed.
        #[arg(long, value_parser = region_name)]
        region: Option<String>,
        /// The variant without a communicator (see `publish packer`).
        #[arg(long)]
        no_communicator: bool,
        #[command(flatten)]
        aws: AwsArgs,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct AwsArgs {
    /// A profile of ~/.aws/config. Default: `[aws] profile`, else AWS_PROFILE.
    #[arg(long)]
    pub(super) profile: Option<String>,
    /// One endpoint for every AWS service (other partitions, test servers). Default:
    /// `[aws] endpoint-url`; AWS_ENDPOINT_URL also works.
    #[arg(long, value_name = "URL", value_parser = endpoint_url)]
    pub(super) endpoint_url: Option<String>,
}

/// `--keep N`: a whole number, 0 or more. A negative one reaches this parser (rather
/// than clap's tip to write `-- -1`), so the message says what the flag takes.
fn count(value: &str) -> Result<usize, String> {
    value.trim().parse::<usize>().map_err(|_| {
        format!(
            "`{value}` is not a count of versions or entries to keep\n  hint: give a whole number, 0 or more, e.g. `--keep 3`"
        )
    })
}

/// `value` when it `fits`, else that it is not `what`, and `hint`.
fn checked(value: &str, fits: bool, what: &str, hint: &str) -> Result<String, String> {
    if fits {
        Ok(value.to_owned())
    } else {
        Err(format!("`{value}` is not {what}\n  hint: {hint}"))
    }
}

/// A version's reference (NAME, NAME@VERSION, NAME@PREFIX): read as written, refused
/// when the name or the version after an `@` is empty.
fn reference(value: &str) -> Result<String, String> {
    crate::store::registry::split_reference(value).map(|_| value.to_owned())
}

/// `publish updates --to`: anything but empty (what it names is checked when opened).
fn feed(value: &str) -> Result<String, String> {
    checked(
        value,
        !value.is_empty(),
        "a feed",
        "`--to` names a directory (made if missing), e.g. `--to ./feed`, or s3://BUCKET/PREFIX",
    )
}

/// What `image test|boot` take: a path that exists, or else a version's reference.
fn target(value: &str) -> Result<PathBuf, String> {
    if !Path::new(value).exists() {
        crate::store::registry::split_reference(value)?;
    }
    Ok(PathBuf::from(value))
}

/// A count or a number of seconds that must be 1 or more.
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(value: &str) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!(
            "`{value}` is not a whole number of 1 or more\n  hint: a batch holds at least one instance and takes at least one second"
        )),
    }
}

/// `publish packer --var NAME=VALUE`: a Packer variable, but not the region (the
/// registry and the dry run go by `--region`).
fn packer_var(value: &str) -> Result<String, String> {
    if value.starts_with("region=") {
        return Err(
            "the region is not a --var\n  hint: give it with --region, so the build, the registry and the dry run agree".into(),
        );
    }
    let assigned = assignment(value, "NAME=VALUE", "--var instance_type=t3.large")?;
    let name = assigned.split_once('=').map_or("", |(n, _)| n);
    let declared: Vec<_> = crate::publish::packer::variables()
        .filter(|v| *v != "region")
        .collect();
    if declared.contains(&name) {
        return Ok(assigned);
    }
    Err(format!(
        "the Packer template has no variable `{name}`\n  hint: --var takes {}",
        declared.join(", ")
    ))
}

/// `--param KEY=VALUE` (whether the template has KEY is checked against it).
fn key_value(value: &str) -> Result<String, String> {
    assignment(value, "KEY=VALUE", "--param InstanceType=t3.small")
}

/// `value` as a `form` (`NAME=VALUE`) with a name before its `=`, as in `example`.
fn assignment(value: &str, form: &str, example: &str) -> Result<String, String> {
    match value.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(value.to_owned()),
        _ => Err(format!(
            "`{value}` is not {form}\n  hint: write e.g. `{example}`"
        )),
    }
}

/// `--region`, checked before anything asks AWS (which would say only that it cannot
/// reach an endpoint made of it).
fn region_name(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("an empty region name (two commas in a row, or one at an end?)\n  hint: separate region names with single commas, e.g. `us-east-1,eu-west-1`".into());
    }
    checked(
        value,
        devos_aws::is_region_name(value),
        "a region name",
        devos_aws::REGION_HINT,
    )
}

/// `publish ami --name`: what EC2 takes as an AMI name.
fn ami_name(value: &str) -> Result<String, String> {
    match devos_aws::ami::ami_name_problem(value) {
        None => Ok(value.to_owned()),
        Some(problem) => Err(format!(
            "`{value}` is not a valid AMI name: {problem}\n  hint: leave --name out for the default NAME-VERSION, or use only letters, digits, spaces and ()[]./-'@_"
        )),
    }
}

/// A CloudFormation stack's name, as CloudFormation takes it: a letter, then letters,
/// digits and dashes, at most 128.
fn stack_name(value: &str) -> Result<String, String> {
    let fits = value.len() <= 128
        && value.starts_with(|c: char| c.is_ascii_alphabetic())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    checked(
        value,
        fits,
        "a CloudFormation stack name",
        "a stack name is a letter, then letters, digits and dashes, at most 128 (e.g. `devos-fleet`)",
    )
}

/// `--endpoint-url`, checked as `[aws] endpoint-url` is: before anything asks AWS
/// (the SDK would fail on it with its whole request in the message).
fn endpoint_url(value: &str) -> Result<String, String> {
    checked(
        value,
        devos_aws::is_http_url(value),
        "an http(s) URL",
        "write it as https://host[:port], e.g. http://127.0.0.1:5000 for a local test server",
    )
}

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Where the cache is, its size, and every stage entry.
    Status {
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
    /// Remove stage entries: all but the --keep most recently used of each stage.
    Prune {
        /// Entries of each stage to keep (the most recently used); 0 empties the
        /// stage cache.
        #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = count)]
        keep: usize,
        /// Also remove downloaded packages, package lists and built agent packages.
        #[arg(long)]
        all: bool,
        /// Say what would change, and change nothing (exit code 3: nothing to do).
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON on stdout (docs/cli.md gives its shape).
        #[arg(long)]
        json: bool,
    },
}

// No doc comment: the variant's (`image build`) is the help text. The boot test's
// options mean something only with --test: clap refuses them without it (and with
// --dry-run, which waives --test's requirement by conflicting with it), rather than
// ignoring them.
#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("boot_test_options")
        .args(["memory", "cpus", "timeout", "keep_vm", "junit", "disk_bus"])
        .multiple(true)
        .requires("test")
        .conflicts_with("dry_run")
))]
pub(crate) struct BuildArgs {
    /// The image spec.
    #[arg(default_value = DEFAULT_SPEC)]
    pub(super) spec: PathBuf,
    /// Output directory. Default: target/images/<name>/<version>/.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Use this prebuilt agent package instead of building devos-agent from source.
    #[arg(long, value_name = "DEB")]
    pub(super) agent_deb: Option<PathBuf>,
    /// Rebuild even if this exact version was already built.
    #[arg(long)]
    pub(super) force: bool,
    /// Build every stage from scratch: neither use nor fill the stage cache.
    #[arg(long)]
    pub(super) no_cache: bool,
    /// Build as usual, then again from scratch without the cache; fail unless the
    /// two are bit-for-bit identical.
    #[arg(long)]
    pub(super) check_reproducible: bool,
    /// Boot-test the image after building it; fail if the test fails.
    #[arg(long)]
    pub(super) test: bool,
    /// Say what would be built (as `image plan` does) and build nothing, after the
    /// checks of the builder's keys the build makes first (exit code 3: this version
    /// is built already).
    #[arg(long, conflicts_with_all = ["test", "check_reproducible", "force", "no_cache"])]
    pub(super) dry_run: bool,
    #[command(flatten)]
    pub(super) vm: VmArgs,
    /// Print the manifest (and test report) as JSON on stdout.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args)]
pub(crate) struct VmArgs {
    #[command(flatten)]
    pub(super) machine: MachineArgs,
    /// Give up on the boot test after this many seconds (the verified trixie image boots
    /// in about a minute under TCG; a broken one is named as soon as its failure shows).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) timeout: u64,
    /// Keep the test VM's overlay and console log, and print where.
    #[arg(long)]
    pub(super) keep_vm: bool,
    /// Also write the results as JUnit XML to this file (for CI systems).
    #[arg(long, value_name = "FILE")]
    pub(super) junit: Option<PathBuf>,
}

/// The machine an image boots in, for `image boot` and the boot test.
#[derive(Args)]
pub(crate) struct MachineArgs {
    /// Guest memory in MiB (at least 256: the firmware, kernel and initrd need it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..))]
    pub(super) memory: u32,
    /// Guest CPUs (at most 288, the most QEMU 7.2's q35 machine takes).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=288))]
    pub(super) cpus: u32,
    /// How the disk is attached: nvme (as on EC2), virtio-blk (QEMU's and libvirt's
    /// default) or virtio-scsi.
    #[arg(long, value_enum, default_value_t)]
    pub(super) disk_bus: DiskBus,
}

impl VmArgs {
    pub(super) fn options(&self) -> TestOptions {
        TestOptions {
            memory_mib: self.machine.memory,
            cpus: self.machine.cpus,
            timeout: Duration::from_secs(self.timeout),
            keep: self.keep_vm,
            disk_bus: self.machine.disk_bus,
            update_to: None,
        }
    }
}
