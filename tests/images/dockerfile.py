"""What a Dockerfile of this project puts in its image, without a container engine.

- `parse_dockerfile` reads the instructions the project's Dockerfiles use (FROM, COPY, RUN, ENV,
  USER, CMD, EXPOSE, WORKDIR, LABEL) into stages; anything else is refused, so that a Dockerfile
  never does something the tests below do not model.
- `DockerIgnore` applies `.dockerignore` as BuildKit does (last matching pattern wins, `!` re-includes,
  a pattern that matches a parent folder matches what it holds).
- `materialize` lays out the final stage in a temporary root folder: the files the final stage
  COPYs from the build context, at their paths, and the virtual environment the builder stage makes
  (`python -m venv DIR` + `pip install ... -r FILE`), built here with the same requirements file and
  pip options. The service then starts from that folder with the image's CMD, ENV and WORKDIR.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# The environment of the python:*-slim base images before our ENV lines.
BASE_IMAGE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
KNOWN_INSTRUCTIONS = {"FROM", "COPY", "RUN", "ENV", "USER", "CMD", "EXPOSE", "WORKDIR", "LABEL"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            if stripped.lower().startswith("# escape="):
                raise AssertionError("the escape directive is not modelled")
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"

    for number, line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in KNOWN_INSTRUCTIONS, f"line {number}: {keyword} is not modelled by tests/images"
        if keyword == "FROM":
            words = args.split()
            assert not words[0].startswith("--"), f"line {number}: FROM flags are not modelled"
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {number}: FROM IMAGE [AS NAME]"
            stages.append(Stage(base=words[0], name=name, index=len(stages)))
        else:
            assert stages, f"line {number}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def parse_copy(args: str) -> Copy:
    from_stage = None
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, _, value = flag[2:].partition("=")
        if name == "from":
            from_stage = value
        elif name not in ("chown", "chmod", "link"):
            raise AssertionError(f"COPY flag --{name} is not modelled")
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    assert len(words) >= 2, f"COPY needs a source and a destination: {args}"
    return Copy(tuple(words[:-1]), words[-1], from_stage)


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """The variables one ENV instruction sets; `$X` and `${X}` refer to the environment before it."""
    words = shlex.split(args)
    if words and "=" not in words[0]:     # legacy `ENV KEY VALUE...`
        pairs = [(words[0], " ".join(words[1:]))]
    else:
        pairs = [tuple(word.split("=", 1)) for word in words]
    assert all(len(p) == 2 for p in pairs), f"ENV: {args}"
    return {key: _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value) for key, value in pairs}


def parse_cmd(args: str) -> list[str]:
    assert args.startswith("["), f"CMD must be in exec form (a JSON array), got {args!r}"
    cmd = json.loads(args)
    assert isinstance(cmd, list) and all(isinstance(w, str) for w in cmd) and cmd
    return cmd


def parse_expose(args: str) -> set[int]:
    return {int(word.split("/")[0]) for word in args.split()}


def shell_commands(run: str) -> list[list[str]]:
    """A RUN line in shell form, split into its simple commands (on `&&`, `;`, `||`)."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


# --- .dockerignore -----------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
            self.rules.append((exception, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative to the context, `/`-separated) is left out of the context."""
        parts = PurePosixPath(path).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for exception, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not exception
        return excluded


# --- the final image, laid out in a folder -------------------------------------------------------

@dataclass(frozen=True)
class VenvRecipe:
    """What the builder stage installs: a venv at `path` with `pip install *pip_args`."""
    path: str
    requirements: Path                  # in the build context
    pip_args: tuple[str, ...]           # with "-r", "<requirements file in the context>"


@dataclass
class Image:
    root: Path
    workdir: Path
    env: dict[str, str]
    cmd: list[str]
    user: str
    exposed: set[int]
    app_files: set[str]                 # files under WORKDIR, relative


def builder_recipe(stage: Stage, context: Path, ignore: DockerIgnore) -> VenvRecipe:
    """Reads the builder stage; fails on anything it does besides making and filling one venv."""
    workdir = PurePosixPath("/")
    copied: dict[str, Path] = {}        # image path -> context file
    venv: str | None = None
    pip_args: tuple[str, ...] | None = None
    requirements: Path | None = None
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        elif instruction.keyword == "COPY":
            copy = parse_copy(instruction.args)
            assert copy.from_stage is None and len(copy.sources) == 1, "builder: one context file per COPY"
            source = context / copy.sources[0]
            assert source.is_file() and not ignore.excluded(copy.sources[0]), f"builder: {copy.sources[0]}"
            dest = workdir / copy.dest
            if copy.dest.endswith("/"):
                dest = dest / source.name
            copied[str(dest)] = source
        elif instruction.keyword == "RUN":
            for command in shell_commands(instruction.args):
                if command[0] in ("python", "python3") and command[1:3] == ["-m", "venv"]:
                    venv = command[-1]
                    continue
                pip = command[0].endswith("/pip") or command[0] == "pip"
                assert pip and command[1] == "install", f"builder: RUN {command} is not modelled"
                assert venv and command[0] == f"{venv}/bin/pip", "builder: pip must be the venv's"
                args = list(command[2:])
                for flag in ("-r", "--requirement"):
                    if flag in args:
                        at = args.index(flag)
                        requirements = copied[str(workdir / args[at + 1])]
                        args[at:at + 2] = ["-r", str(requirements)]
                assert requirements is not None, "builder: pip install -r FILE"
                assert not [a for a in args if not a.startswith("-") and a != str(requirements)], \
                    f"builder: installs packages besides its requirements file: {command}"
                pip_args = tuple(args)
        elif instruction.keyword not in ("ENV", "LABEL"):
            raise AssertionError(f"builder: {instruction.keyword} is not modelled")
    assert venv and pip_args and requirements, "the builder stage must make a venv and pip install -r into it"
    return VenvRecipe(venv, requirements, pip_args)


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name or str(stage.index) == name:
            return stage
    raise AssertionError(f"COPY --from={name}: no such stage")


def copy_from_context(source: Path, rel: str, dest: Path, ignore: DockerIgnore) -> None:
    assert source.exists() and not ignore.excluded(rel), \
        f"COPY {rel}: not in the build context (missing or left out by .dockerignore)"
    if source.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        return
    for path in sorted(source.rglob("*")):        # a folder: its content, as Docker copies it
        inner = f"{rel.rstrip('/')}/{path.relative_to(source).as_posix()}"
        if path.is_file() and not ignore.excluded(inner):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def materialize(dockerfile: Path, context: Path, root: Path, venv_for: Callable[[VenvRecipe], Path]) -> Image:
    """Lays out the final stage of `dockerfile` under `root` (the image's `/`)."""
    stages = parse_dockerfile(dockerfile.read_text())
    ignore = DockerIgnore((context / ".dockerignore").read_text())
    final = stages[-1]
    env = dict(BASE_IMAGE_ENV)
    workdir = PurePosixPath("/")
    cmd: list[str] = []
    user = "root"
    exposed: set[int] = set()
    for instruction in final.instructions:
        keyword, args = instruction.keyword, instruction.args
        if keyword == "WORKDIR":
            workdir = workdir / args
            (root / str(workdir).lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            copy = parse_copy(args)
            dest = workdir / copy.dest
            if copy.from_stage is not None:
                recipe = builder_recipe(stage_by_name(stages, copy.from_stage), context, ignore)
                assert copy.sources == (recipe.path,), f"COPY --from: only the builder's venv is modelled: {args}"
                target = root / str(dest).lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(venv_for(recipe), target_is_directory=True)
                continue
            for rel in copy.sources:
                source = context / rel
                target = root / str(dest).lstrip("/")
                into_folder = copy.dest.endswith("/") or copy.dest in (".", "..") or len(copy.sources) > 1
                if source.is_file() and (into_folder or target.is_dir()):
                    target = target / source.name
                copy_from_context(source, rel, target, ignore)
        elif keyword == "ENV":
            env.update(parse_env(args, env))
        elif keyword == "USER":
            user = args
        elif keyword == "CMD":
            cmd = parse_cmd(args)
        elif keyword == "EXPOSE":
            exposed |= parse_expose(args)
    app = root / str(workdir).lstrip("/")
    app_files = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()}
    return Image(root, app, env, cmd, user, exposed, app_files)


def host_env(image: Image) -> dict[str, str]:
    """The image's environment with PATH entries that exist in the image pointed into its folder."""
    env = dict(image.env)
    entries = []
    for entry in env["PATH"].split(":"):
        inside = image.root / entry.lstrip("/")
        entries.append(str(inside) if entry.startswith("/") and inside.exists() else entry)
    env["PATH"] = ":".join(entries)
    return env


def make_venv(recipe: VenvRecipe, path: Path, python: str = sys.executable) -> None:
    """A fresh venv with exactly what the builder installs (pip's usual index and configuration)."""
    subprocess.run([python, "-m", "venv", str(path)], check=True, timeout=120)
    result = subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", *recipe.pip_args], check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip install {' '.join(recipe.pip_args)} failed:\n{result.stderr}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (following the venv symlink) with its size and mtime."""
    files = {}
    for top, _dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(top) / name
            stat = path.lstat()
            files[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return files
