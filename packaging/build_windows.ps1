# Build Kestrel for Windows: a one-folder PyInstaller bundle (dist\Kestrel\Kestrel.exe, windowed, with
# icon and version info), a self-test of the built exe, and an installer when Inno Setup is installed.
#
#   powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 [-TorchIndex URL] [-ReuseVenv] [-SkipSelfTest]
#
#   -TorchIndex  where pip gets torch. Default: the CUDA 12.4 wheels (https://download.pytorch.org/whl/cu124);
#                PyPI's Windows torch is CPU-only. Pass https://download.pytorch.org/whl/cpu for a small build.
#   -Python      the Python to build the venv with (default: py -3.11, else python)
#   -ReuseVenv   take packaging\build\venv as it is (no pip step), e.g. after a first run
#
# With the CUDA toolkit (nvcc, CUDA_PATH) and Visual Studio's C++ tools, `pip install -e` compiles the CUDA
# extension (setup.py; minutes) and the spec bundles app\engine\*.pyd; without them the bundle runs the
# PyTorch path on the GPU.
#
# Outputs in packaging\dist\: Kestrel\Kestrel.exe, Kestrel-<version>-windows-x64.zip and, with Inno Setup 6
# (iscc.exe on PATH or in its default folder), Kestrel-<version>-setup.exe (Start-menu + optional desktop
# shortcut; see kestrel.iss).
param(
    [string]$TorchIndex = "https://download.pytorch.org/whl/cu124",
    [string]$Python = "",
    [switch]$ReuseVenv,
    [switch]$SkipSelfTest
)
$ErrorActionPreference = "Stop"
$Pkg = $PSScriptRoot
$Repo = Split-Path $Pkg -Parent
$Build = Join-Path $Pkg "build"
$Dist = Join-Path $Pkg "dist"
$Version = (Select-String -Path (Join-Path $Repo "app\__init__.py") -Pattern '^__version__ = "(.*)"').Matches[0].Groups[1].Value
Write-Host "== Kestrel $Version for windows-x64"

# 1. A build venv, so the bundle holds exactly the project's dependencies.
$Venv = Join-Path $Build "venv"
$Py = Join-Path $Venv "Scripts\python.exe"
if (-not (Test-Path $Py)) {
    if ($Python) { & $Python -m venv $Venv }
    elseif (Get-Command py -ErrorAction SilentlyContinue) { & py -3.11 -m venv $Venv }
    else { & python -m venv $Venv }
    if ($LASTEXITCODE -ne 0) { throw "could not create the build venv in $Venv" }
}
if (-not $ReuseVenv) {
    & $Py -m pip install --quiet --upgrade pip
    & $Py -m pip install --quiet torch --index-url $TorchIndex
    if ($LASTEXITCODE -ne 0) { throw "pip could not install torch from $TorchIndex" }
    & $Py -m pip install --quiet -e $Repo "pyinstaller>=6.6"
    if ($LASTEXITCODE -ne 0) { throw "pip could not install Kestrel's dependencies" }
}
& $Py -c "import torch; print('== torch', torch.__version__, 'CUDA', torch.version.cuda)"
$Ext = Get-ChildItem (Join-Path $Repo "app\engine\kestrel_cuda*.pyd") -ErrorAction SilentlyContinue
if ($Ext) { Write-Host "== the spec bundles $($Ext.FullName)" }
else { Write-Host "== no CUDA extension built (app\engine\kestrel_cuda*.pyd): the bundle will use the PyTorch path" }
# Every dependency in pyproject.toml installed (-ReuseVenv installs nothing), the extension's state.
& $Py (Join-Path $Pkg "check_venv.py")
if ($LASTEXITCODE -ne 0) { throw "the build venv lacks dependencies (see above)" }

# 2. The bundle (the spec adds the icon and the version resource on Windows).
$Timer = [Diagnostics.Stopwatch]::StartNew()
& $Py -m PyInstaller --noconfirm --clean --log-level WARN --distpath $Dist --workpath (Join-Path $Build "pyinstaller") (Join-Path $Pkg "kestrel.spec")
if ($LASTEXITCODE -ne 0) { throw "PyInstaller failed" }
$Exe = Join-Path $Dist "Kestrel\Kestrel.exe"
$SizeMB = [math]::Round(((Get-ChildItem (Join-Path $Dist "Kestrel") -Recurse | Measure-Object Length -Sum).Sum / 1MB), 0)
Write-Host "== bundle built in $([int]$Timer.Elapsed.TotalSeconds) s: $Exe ($SizeMB MB)"

# 3. Prove it starts. Kestrel.exe is windowed (no console), so its output goes to a file.
if (-not $SkipSelfTest) {
    $Tmp = Join-Path ([IO.Path]::GetTempPath()) ("kestrel-selftest-" + [guid]::NewGuid())
    New-Item -ItemType Directory $Tmp | Out-Null
    $env:QT_QPA_PLATFORM = "offscreen"
    $p = Start-Process -FilePath $Exe -ArgumentList "--self-test", "--db", "$Tmp\chats.sqlite3", "--config-dir", "$Tmp\config" `
        -RedirectStandardOutput "$Tmp\out.txt" -RedirectStandardError "$Tmp\err.txt" -Wait -PassThru
    Remove-Item Env:QT_QPA_PLATFORM
    Get-Content "$Tmp\out.txt"
    if ($p.ExitCode -ne 0) { Get-Content "$Tmp\err.txt"; throw "self-test failed with exit code $($p.ExitCode)" }
    Write-Host "== self-test passed"
}

# 4. Zip of the folder (portable use) and the installer.
$Zip = Join-Path $Dist "Kestrel-$Version-windows-x64.zip"
if (Test-Path $Zip) { Remove-Item $Zip }
Compress-Archive -Path (Join-Path $Dist "Kestrel") -DestinationPath $Zip
Write-Host "== $Zip"
$Iscc = (Get-Command iscc.exe -ErrorAction SilentlyContinue).Source
if (-not $Iscc) { $Iscc = "${env:ProgramFiles(x86)}\Inno Setup 6\ISCC.exe" }
if (Test-Path $Iscc) {
    & $Iscc "/DAppVersion=$Version" "/DDistDir=$Dist\Kestrel" "/O$Dist" (Join-Path $Pkg "kestrel.iss")
    if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed" }
    Write-Host "== $Dist\Kestrel-$Version-setup.exe"
} else {
    Write-Host "== no installer: Inno Setup 6 is not installed (https://jrsoftware.org/isdl.php)"
}
